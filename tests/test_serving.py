"""The worker's head check and the metrics archive, without a server."""

import json
import os
import re

import pytest
from prometheus_client.mmap_dict import MmapedDict

from serving.metrics_archive import archive_dead_worker, directory_lock
from serving.worker import HEAD_LIMIT, head_ready


@pytest.mark.parametrize("head, ready", [
    (b"", False),
    (b"GET / HTTP/1.1\r\nHost: x\r\n", False),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r", False),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", True),
    (b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", True),
    (b"GET / HTTP/1.1\nHost: x", True),  # bare LF: the parser rejects it at once
    (b"\n", True),
    (b"x" * HEAD_LIMIT, True),  # too long to wait for: the parser answers 431
])
def test_head_ready(head, ready):
    assert head_ready(bytearray(head)) is ready


def test_head_ready_finds_an_end_split_across_reads():
    head = bytearray(b"GET / HTTP/1.1\r\nHost: x\r\n\r")
    start = len(head)
    head += b"\n"
    assert head_ready(head, start)


def key(name, **labels):
    return json.dumps([name, name, labels, "help"])


def write(path, values):
    store = MmapedDict(str(path))
    for name, value in values.items():
        store.write_value(name, value, 0.0)
    store.close()


def read(path):
    return {k: v for k, v, _, _ in MmapedDict.read_all_values_from_file(str(path))}


def test_dead_workers_add_up_in_the_archive_and_their_files_go(tmp_path):
    a, b = key("requests_total", status="200"), key("requests_total", status="500")
    write(tmp_path / "counter_101.db", {a: 3.0, b: 1.0})
    write(tmp_path / "counter_102.db", {a: 4.0})
    write(tmp_path / "histogram_101.db", {key("latency_bucket", le="1.0"): 2.0})
    write(tmp_path / "gauge_livemin_103.db", {key("healthy"): 1.0})
    archive_dead_worker(str(tmp_path), 101)
    archive_dead_worker(str(tmp_path), 102)
    assert read(tmp_path / "counter_archive.db") == {a: 7.0, b: 1.0}
    assert read(tmp_path / "histogram_archive.db") == {key("latency_bucket", le="1.0"): 2.0}
    left = sorted(p.name for p in tmp_path.glob("*.db"))
    assert left == ["counter_archive.db", "gauge_livemin_103.db", "histogram_archive.db"]


def test_a_worker_without_files_leaves_the_archive_alone(tmp_path):
    archive_dead_worker(str(tmp_path), 999)
    assert not list(tmp_path.glob("*.db"))


def test_the_lock_is_shared_by_readers(tmp_path):
    with directory_lock(str(tmp_path), exclusive=False):
        with directory_lock(str(tmp_path), exclusive=False):
            pass


def test_a_new_workers_files_are_readable_from_the_start(tmp_path):
    from serving.metrics_archive import create_worker_files

    create_worker_files(str(tmp_path), 4242)
    names = sorted(p.name for p in tmp_path.glob("*.db"))
    assert names == ["counter_4242.db", "gauge_livemax_4242.db", "gauge_livemin_4242.db",
                     "gauge_livesum_4242.db", "histogram_4242.db"]
    assert all(read(tmp_path / name) == {} for name in names)


def test_the_worker_files_cover_every_gauge_mode_the_app_uses():
    from serving.metrics_archive import WORKER_FILES

    with open(os.path.join(os.path.dirname(__file__), "..", "app", "metrics.py")) as handle:
        modes = set(re.findall(r'multiprocess_mode="(\w+)"', handle.read()))
    assert modes and {f"gauge_{mode}" for mode in modes} <= set(WORKER_FILES)
