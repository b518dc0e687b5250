"""The heap bound gives freed heap pages back: measured against the kernel's own accounting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from actstore.store import heap

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/statm").exists() or heap._MALLOC_TRIM is None,
    reason="needs Linux /proc and glibc's malloc_trim",
)


def _rss_anon_status() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def test_resident_anon_is_the_kernels_rss_anon() -> None:
    a = heap.resident_anon_bytes()
    b = _rss_anon_status()
    assert a is not None
    assert abs(a - b) < 8 << 20  # read a moment apart


# In a fresh interpreter (a heap of its own): touch 2000 blocks of 64 KiB from the main
# arena (below the mmap threshold), pin the heap's top with one more block, free the
# blocks. glibc keeps the freed, touched pages (they are not at the top), so the
# process's RssAnon stays up until the bound releases them.
CHILD = r"""
import ctypes, ctypes.util, json, sys
sys.path[:0] = [sys.argv[1]]
from actstore.store import heap
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

out = {}
lazy = heap.HeapBound(slack=1 << 40)
bound = heap.HeapBound(slack=64 << 20)
out["first"] = [lazy.after_batch(), bound.after_batch()]  # the first batch: the level
blocks = [libc.malloc(64 << 10) for _ in range(2000)]
for b in blocks:
    ctypes.memset(b, 1, 64 << 10)
pin = libc.malloc(64 << 10)
ctypes.memset(pin, 1, 64 << 10)
for b in blocks:
    libc.free(b)
out["freed"] = anon()
out["lazy_released"] = lazy.after_batch()
out["after_lazy"] = anon()
out["bound_released"] = bound.after_batch()
out["after_bound"] = anon()
out["releases"] = bound.releases
print(json.dumps(out))
"""


def test_bound_releases_touched_free_pages_and_only_past_its_slack() -> None:
    root = str(Path(__file__).resolve().parents[2])
    got = subprocess.run(
        [sys.executable, "-c", CHILD, root], capture_output=True, text=True, check=True
    )
    m = json.loads(got.stdout)
    assert m["first"] == [False, False]
    # a bound of 1 TiB is not reached: nothing is released, the pages stay resident
    assert m["lazy_released"] is False
    assert m["after_lazy"] > m["freed"] - (8 << 20)
    # 125 MiB of freed, touched pages exceed a 64 MiB bound: released to the OS
    assert m["bound_released"] is True and m["releases"] == 1
    assert m["after_bound"] < m["freed"] - (100 << 20)


def test_release_measures_the_new_level() -> None:
    b = heap.HeapBound(slack=1 << 40)
    b.release()
    assert b.releases == 1
    assert b.after_batch() is False  # just released: nothing has grown past the bound


@pytest.mark.parametrize("released", [False, True])
def test_the_first_batch_measures_the_level(released: bool) -> None:
    """What the first batch (or the first after a release) touches (the model's working
    set) is the level bounded, not growth; growth past the slack after it is released."""
    import numpy as np

    b = heap.HeapBound(slack=32 << 20)
    if released:
        b.release()
    work = np.ones(64 << 17)  # 64 MiB touched, like a forward pass's working set
    assert b.after_batch() is False and b.releases == int(released)  # the level
    more = np.ones(64 << 17)  # then 64 MiB more: past the 32 MiB slack
    assert b.after_batch() is True and b.releases == int(released) + 1
    assert b.after_batch() is False  # measuring again, right after the release
    del work, more


def test_the_level_does_not_creep_up_release_by_release() -> None:
    """A batch measured right after a release can land higher than the first level (what
    is in use at that moment); the bound stays the first level's, so the peak of a long
    run does not grow with its releases. Unless the trimmed heap itself is past the bound:
    then that is the level, and the next batches do not release again."""
    import numpy as np

    b = heap.HeapBound(slack=128 << 20)
    assert b.after_batch() is False  # the level L
    held = np.ones(64 << 17)  # L + 64 MiB in use: within the slack
    assert b.after_batch() is False
    b.release()
    assert b.after_batch() is False  # measures L + 64 MiB: the level stays L
    more = np.ones(100 << 17)  # L + 164 MiB: past L + 128 (not past L + 64 + 128)
    assert b.after_batch() is True and b.releases == 2
    b2 = heap.HeapBound(slack=32 << 20)
    assert b2.after_batch() is False
    big = np.ones(64 << 17)  # 64 MiB in use, past the 32 MiB slack: released, and kept
    assert b2.after_batch() is True
    assert b2.after_batch() is False and b2.after_batch() is False  # the new level
    assert b2.releases == 1
    del held, more, big


def test_slack_from_the_environment(monkeypatch) -> None:
    from actstore.errors import InputError

    monkeypatch.setenv("ACTSTORE_HEAP_SLACK_MIB", "512")
    assert heap.HeapBound().slack == 512 << 20
    monkeypatch.setenv("ACTSTORE_HEAP_SLACK_MIB", "lots")
    with pytest.raises(InputError, match="ACTSTORE_HEAP_SLACK_MIB='lots' is not a whole number"):
        heap.HeapBound()
    monkeypatch.delenv("ACTSTORE_HEAP_SLACK_MIB")
    assert heap.HeapBound().slack == heap.DEFAULT_SLACK


# In a fresh interpreter: how many bytes of fresh mappings glibc makes for one 20 MiB
# block (its own accounting, mallinfo2's hblkhd), with or without adapt_thresholds.
ADAPT_CHILD = r"""
import ctypes, json, sys
sys.path[:0] = [sys.argv[1]]
from actstore.store import heap
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
        "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
adapted = [heap.adapt_thresholds(), heap.adapt_thresholds()] if sys.argv[2] == "adapt" else []
before = libc.mallinfo2().hblkhd
block = libc.malloc(20 << 20)
print(json.dumps({"adapted": adapted, "mapped": libc.mallinfo2().hblkhd - before}))
libc.free(block)
"""


def _child(script: str, *args: str, **malloc_env: str) -> dict:
    """Run ``script`` in a fresh interpreter (its own heap), only ``malloc_env`` of MALLOC_*."""
    root = str(Path(heap.__file__).parents[2])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    out = subprocess.run(
        [sys.executable, "-c", script, root, *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={**env, **malloc_env},
    )
    return json.loads(out.stdout)


def test_adapted_thresholds_serve_large_blocks_from_the_heap() -> None:
    plain, adapted = _adapt_child("plain"), _adapt_child("adapt")
    assert plain["mapped"] >= 20 << 20  # a fresh mapping, faulted in on every use
    assert adapted == {"adapted": [True, False], "mapped": 0}  # reused heap pages; once


def test_thresholds_someone_set_stay_as_they_were_set() -> None:
    # a threshold set by the environment (as dask's nannies set one for their workers)
    # turns glibc's adaptation off: adapt_thresholds changes nothing then
    got = _adapt_child("adapt", MALLOC_TRIM_THRESHOLD_="65536")
    assert got["mapped"] >= 20 << 20


def test_bytes_the_owner_holds_are_not_growth() -> None:
    import numpy as np

    bound = heap.HeapBound(slack=32 << 20)
    block = np.ones(96 << 20, np.uint8)  # touched and in use, as a writer's shard buffers
    bound.hold(block.nbytes)
    assert bound.after_batch() is False
    bound.hold(0)
    assert bound.after_batch() is True  # the same memory, not held: past the slack
    del block


# In a fresh interpreter: touch six 16 MiB blocks (heap-served once the thresholds are
# adapted) at the top of the heap and free them. glibc trims a top of more than 64 MiB
# on free, unless keep_heap_top holds it; then malloc_trim (HeapBound's release) still
# gives it back, and after the context glibc trims again.
KEEP_CHILD = r"""
import ctypes, json, sys
sys.path[:0] = [sys.argv[1]]
from actstore.store import heap
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def freed_mib(release=False):
    blocks = [libc.malloc(16 << 20) for _ in range(6)]
    for b in blocks:
        ctypes.memset(b, 1, 16 << 20)
    before = heap.resident_anon_bytes()
    for b in reversed(blocks):
        libc.free(b)
    if release:
        heap.release_freed_memory()
    return (before - heap.resident_anon_bytes()) / 2**20

held = libc.malloc(100 << 20) if sys.argv[2:] == ["mapped"] else None  # a mapped block, kept
out = {"adapted": heap.adapt_thresholds(), "plain": freed_mib()}
with heap.keep_heap_top() as kept:
    with heap.keep_heap_top() as inner:
        out["kept"], out["inner"] = kept, inner
        out["inside"] = freed_mib()
    out["after_inner"] = freed_mib()
    out["released"] = freed_mib(release=True)
out["after"] = freed_mib()
print(json.dumps(out))
"""


def _adapt_child(mode: str, **malloc_env: str) -> dict:
    return _child(ADAPT_CHILD, mode, **malloc_env)


def _keep_child(*args: str, **malloc_env: str) -> dict:
    return _child(KEEP_CHILD, *args, **malloc_env)


@pytest.mark.parametrize("mapped", [False, True])
def test_keep_heap_top_keeps_the_freed_top_until_a_release(mapped: bool) -> None:
    # mapped: a 100 MiB block (over the mmap threshold, as a model's largest tensors) is held
    got = _keep_child(*(["mapped"] if mapped else []))
    assert got["adapted"] and got["kept"] and got["inner"]
    assert got["plain"] > 48  # glibc trimmed the top each time more than 64 MiB was free
    assert got["inside"] < 8 and got["after_inner"] < 8  # kept, also once the inner one left
    assert got["released"] > 80  # malloc_trim still gives it back
    assert got["after"] > 48  # the threshold is back: glibc trims on free again


def test_keep_heap_top_leaves_thresholds_someone_set() -> None:
    got = _keep_child(MALLOC_TRIM_THRESHOLD_="65536")
    assert got["kept"] is False and got["inner"] is False
    assert got["inside"] > 80  # the environment's threshold (64 KiB) still trims
