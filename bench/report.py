"""Render the benchmark's results as one markdown report."""

import os
import platform
import statistics
import subprocess
from dataclasses import dataclass

from clients import LoadStats


@dataclass
class Row:
    """One load run: who served it, at how many connections, and what it cost the server."""

    path: str
    conns: int
    stats: LoadStats
    cpu_ms: float           # server process tree CPU per request
    rss_mib: float          # server process tree RSS after the run
    upstream_conns: int     # connections the upstream accepted during the run
    added_p50: float = None
    added_p99: float = None
    others_cores: float = 0.0   # CPU used meanwhile by processes outside the benchmark


def box_facts(repo):
    """Return the facts about the machine and the code that the numbers belong to."""
    model = "unknown"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=repo,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    with open("/proc/loadavg") as handle:
        load = " ".join(handle.read().split()[:3])
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "kernel": platform.release(), "commit": commit or "unknown", "load": load}


def _ms(value):
    return "" if value is None else f"{value:.2f}"


def _added(value):
    return "" if value is None else f"{value:+.2f}"


def render_load(rows):
    """Return the table of plain-request runs."""
    lines = ["| path | conns | RPS | p50 ms | p90 ms | p99 ms | added p50 ms | added p99 ms "
             "| server CPU ms/req | server RSS MiB | upstream conns opened | others' CPU (cores) "
             "| errors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        s = row.stats
        errors = f"{s.errors} ({s.error_sample[:60]})" if s.errors else "0"
        lines.append(f"| {row.path} | {row.conns} | {s.rps:,.0f} | {_ms(s.p50)} | "
                     f"{_ms(s.p90)} | {_ms(s.p99)} | {_added(row.added_p50)} | "
                     f"{_added(row.added_p99)} | {row.cpu_ms:.3f} | {row.rss_mib:.1f} | "
                     f"{row.upstream_conns} | {row.others_cores:.2f} | {errors} |")
    return "\n".join(lines)


def first_byte_summary(results):
    """Return (median ms, p90 ms, failures) of a list of StreamResults."""
    times = sorted(r.first_byte * 1000 for r in results if r.ok)
    if not times:
        return 0.0, 0.0, len(results)
    p90 = times[min(len(times) - 1, round(0.9 * len(times)) - 1)]
    return statistics.median(times), p90, sum(not r.ok for r in results)


def render_streams(direct, gateway):
    """Return the time-to-first-byte table, direct vs through the gateway."""
    d50, d90, dfail = first_byte_summary(direct)
    g50, g90, gfail = first_byte_summary(gateway)
    return "\n".join([
        "| stream, time to first `data:` | n | median ms | p90 ms | failed |",
        "|---|---:|---:|---:|---:|",
        f"| direct upstream | {len(direct)} | {d50:.2f} | {d90:.2f} | {dfail} |",
        f"| through gateway | {len(gateway)} | {g50:.2f} | {g90:.2f} | {gfail} |",
        f"| **overhead** | | **{g50 - d50:+.2f}** | {g90 - d90:+.2f} | |",
    ])


def render_many(many, chunks, interval, rss_after):
    """Return the many-streams table."""
    errors = "; ".join(many.errors) or "-"
    return "\n".join([
        "| concurrent slow streams | failed | peak open at once | first byte > 1 s "
        "| first byte max s | duration max s | gateway RSS MiB while open (peak) | RSS after "
        "| errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| {many.count} ({chunks} chunks, one per {interval * 1000:.0f} ms) | {many.failed} "
        f"| {many.peak_open} | {many.late} | {many.first_byte_max:.2f} "
        f"| {many.duration_max:.2f} "
        f"| {many.rss_peak_mib:.1f} | {rss_after:.1f} | {errors} |",
    ])


def render_targets(targets):
    """Return the table of figures beside their targets (informative only)."""
    lines = ["| figure | measured | target | met |", "|---|---:|---:|---|"]
    for name, measured, target, met in targets:
        lines.append(f"| {name} | {measured} | {target} | {'yes' if met else '**no**'} |")
    return "\n".join(lines)


def render_box(box, settings):
    """Return the box and settings as a short bullet list."""
    items = [f"- box: {box['nproc']} cores, {box['cpu']}, Linux {box['kernel']}, "
             f"Python {box['python']}, commit {box['commit']}, load average at the end "
             f"{box['load']}"]
    items += [f"- {text}" for text in settings]
    return "\n".join(items)


def render(title, box, settings, sections):
    """Return the whole report: a title, the box, then ``(heading, body)`` sections."""
    parts = [f"# {title}", "", render_box(box, settings)]
    for heading, body in sections:
        parts += ["", f"## {heading}", "", body]
    return "\n".join(parts) + "\n"
