"""Keep the prometheus multiprocess directory bounded: fold dead workers' files into an archive.

Each worker writes its counters and histograms to files named for its
pid, and prometheus_client never removes them, so every recycled worker
(``max_requests``, HUP, a crash) leaves files behind that every scrape
reads again. When a worker has exited, the master adds its values to one
archive file per kind (``counter_archive.db``, ``histogram_archive.db``),
which the multiprocess collector reads like any other file, and deletes
the dead worker's files: counters stay exact, the directory stays at a
few files per live worker.

Only kinds whose values add up are folded. Live gauges of dead workers
are dropped by ``mark_process_dead`` as before; the app has no other
gauge modes.

The master folds with the directory's lock held exclusively and a scrape
reads with it held shared, so a scrape never sees a value twice (in the
archive and in the dead worker's file) or not at all. A new worker
creates its own files under the same lock: prometheus_client creates a
file empty and only then sizes it, and a scrape that read it in between
failed (a 500 from /metrics at every few worker starts while recycling).

Import this only after ``PROMETHEUS_MULTIPROC_DIR`` is set: importing
prometheus_client chooses its value class from that variable.
"""

import contextlib
import fcntl
import os

from prometheus_client.mmap_dict import MmapedDict

FOLDED_KINDS = ("counter", "histogram", "summary")
# The files a worker of this app writes (app/metrics.py: counters,
# histograms, and gauges in livemin, livesum and livemax modes), named as
# prometheus_client names them. A new multiprocess_mode there belongs here too.
WORKER_FILES = ("counter", "histogram", "gauge_livemin", "gauge_livesum", "gauge_livemax")
LOCK_NAME = "archive.lock"  # not *.db: the collector only reads *.db


@contextlib.contextmanager
def directory_lock(directory, exclusive):
    """Hold the directory's lock: shared to read a scrape, exclusive to fold files."""
    fd = os.open(os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def create_worker_files(directory, pid):
    """Create a new worker's value files whole, before a scrape can see them."""
    with directory_lock(directory, exclusive=True):
        for prefix in WORKER_FILES:
            MmapedDict(os.path.join(directory, f"{prefix}_{pid}.db")).close()


def archive_dead_worker(directory, pid):
    """Fold an exited worker's counter, histogram and summary files into the archive."""
    with directory_lock(directory, exclusive=True):
        for kind in FOLDED_KINDS:
            dead = os.path.join(directory, f"{kind}_{pid}.db")
            if os.path.exists(dead):
                fold(dead, os.path.join(directory, f"{kind}_archive.db"))


def fold(dead, archive):
    """Add the values of ``dead`` to ``archive`` (replaced atomically), then delete ``dead``."""
    totals = {}
    for path in (archive, dead):
        if not os.path.exists(path):
            continue
        for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(path):
            total, latest = totals.get(key, (0.0, 0.0))
            totals[key] = (total + value, max(latest, timestamp))
    # Not *.db, so the collector never reads it half-written.
    temporary = archive + ".tmp"
    if os.path.exists(temporary):
        os.unlink(temporary)  # left by a master that died mid-fold
    values = MmapedDict(temporary)
    try:
        for key, (total, latest) in totals.items():
            values.write_value(key, total, latest)
    finally:
        values.close()
    os.replace(temporary, archive)
    os.unlink(dead)
