"""Start, watch and stop the benchmark's servers; read their CPU time and RSS from /proc.

Every server runs in its own session (process group), so stopping it
also stops whatever it forked, and ``Processes.stop_all`` runs from a
``finally`` whatever happened.
"""

import os
import resource
import signal
import socket
import subprocess
import time

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def raise_open_files_limit(wanted=65536):
    """Raise this process's open-files limit (children inherit it); return the new one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port():
    """Return a TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout, what, interval=0.05):
    """Poll ``predicate`` until it returns truthy; raise RuntimeError naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")


class Processes:
    """The servers this run started, stopped in reverse order by ``stop_all``."""

    def __init__(self, log_dir):
        self.log_dir = log_dir
        self.started = []

    def start(self, name, argv, *, env=None, cwd=None, stdout=None):
        """Start ``argv`` in a new session, stderr (and stdout) to ``<log_dir>/<name>.log``."""
        log = open(os.path.join(self.log_dir, f"{name}.log"), "wb")
        process = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                   stdout=stdout or log, stderr=log, start_new_session=True)
        process.bench_name, process.bench_log = name, log
        self.started.append(process)
        return process

    def log_tail(self, process, lines=30):
        """Return the last lines of a process's log."""
        with open(process.bench_log.name, "rb") as handle:
            text = handle.read().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self, process):
        """Raise RuntimeError with the log tail if ``process`` has exited."""
        if process.poll() is not None:
            raise RuntimeError(f"{process.bench_name} exited with {process.returncode}:\n"
                               + self.log_tail(process))

    def stop_all(self):
        """Stop every started process and its group: TERM, then KILL."""
        for process in reversed(self.started):
            stop_group(process)
            process.bench_log.close()
        self.started.clear()


def stop_group(process, grace=10.0):
    """Send TERM to the leader, KILL the whole group if it has not gone within ``grace``."""
    if process.poll() is None:
        try:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _stat_fields(pid):
    """Return the fields of /proc/<pid>/stat after the command name (field 3 first)."""
    with open(f"/proc/{pid}/stat") as handle:
        text = handle.read()
    return text[text.rindex(")") + 2:].split()


def process_tree(root):
    """Return ``root`` and all its descendants' pids."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            parent = int(_stat_fields(entry)[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(children.get(pid, ()))
    return tree


def cpu_ticks(root):
    """Return ``{pid: utime + stime}`` in clock ticks for ``root``'s process tree."""
    ticks = {}
    for pid in process_tree(root):
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        ticks[pid] = int(fields[11]) + int(fields[12])
    return ticks


def cpu_seconds_between(before, after):
    """Return the CPU seconds the tree spent between two ``cpu_ticks`` snapshots."""
    return sum(t - before.get(pid, 0) for pid, t in after.items()) / CLOCK_TICKS


def busy_cpu_seconds():
    """Return the CPU seconds the whole box has been busy since boot (all cores)."""
    with open("/proc/stat") as handle:
        fields = [int(x) for x in handle.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def tree_cpu_seconds(root):
    """Return the CPU seconds of ``root``'s tree, children it has reaped included."""
    total = 0
    for pid in process_tree(root):
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15])
    return total / CLOCK_TICKS


def rss_mib(root):
    """Return the summed VmRSS of ``root``'s process tree, in MiB."""
    total_kib = 0
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        total_kib += int(line.split()[1])
                        break
        except OSError:
            continue
    return total_kib / 1024
