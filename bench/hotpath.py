"""Profile the gateway under load with py-spy, and summarise where its Python time goes.

py-spy is a tool for the person running the benchmark, not a dependency
of the project: ``.venv/bin/pip install py-spy``.
"""

import collections
import os
import re
import shutil
import subprocess
import sys

_FILE = re.compile(r"\((.*?):\d+\)$")
_PLUMBING = ("Thread._bootstrap", "Thread.run ", "_worker (concurrent", "_WorkItem.run",
             "<module> (gunicorn", "run (gunicorn", "Application.run", "Arbiter.",
             "BaseApplication.run", "Worker.init_process", "ThreadWorker.init_process",
             "ThreadWorker.run ")


def py_spy():
    """Return the py-spy binary next to this Python, or on PATH; raise if there is none."""
    local = os.path.join(os.path.dirname(sys.executable), "py-spy")
    found = local if os.path.exists(local) else shutil.which("py-spy")
    if not found:
        raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")
    return found


def start_recording(pid, seconds, out):
    """Start sampling ``pid`` and its workers (GIL holders only) for ``seconds``."""
    argv = [py_spy(), "record", "--pid", str(pid), "--subprocesses", "--gil",
            "--format", "raw", "--rate", "250", "--duration", str(int(seconds)), "-o", out]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _package(frame):
    """Return the package (or app module) a frame's file belongs to."""
    match = _FILE.search(frame)
    path = match.group(1) if match else frame
    if path.startswith("app/") or "/app/" in path:
        return "app/" + path.split("app/", 1)[1]
    return path.split("/")[0]


def read_stacks(path):
    """Yield ``(frames, samples)`` from py-spy's collapsed-stack output."""
    with open(path) as handle:
        for line in handle:
            stack, _, count = line.rstrip().rpartition(" ")
            frames = [f for f in stack.split(";") if not f.startswith("process ")]
            if frames and count.isdigit():
                yield frames, int(count)


def summarise(path, top=20):
    """Return markdown: self time by package, and inclusive time by function."""
    by_package, inclusive, total = collections.Counter(), collections.Counter(), 0
    for frames, count in read_stacks(path):
        total += count
        by_package[_package(frames[-1])] += count
        for frame in set(frames):
            if not frame.startswith(_PLUMBING):
                inclusive[frame] += count
    if not total:
        return "(py-spy recorded no samples)"
    lines = [f"{total} samples of GIL-holding threads. Self time by package:", "",
             "| package | self % |", "|---|---:|"]
    lines += [f"| {k} | {c / total * 100:.1f} |" for k, c in by_package.most_common(top)]
    lines += ["", "Inclusive time by function:", "", "| function | incl % |", "|---|---:|"]
    lines += [f"| `{k}` | {c / total * 100:.1f} |" for k, c in inclusive.most_common(top)]
    return "\n".join(lines)
