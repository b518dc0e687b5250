"""Keep an ingest's resident memory flat: give freed heap pages back to the OS, bounded.

An ingest frees the same amount of memory every batch (the model's activations,
their host copies, the statistics' temporaries), but glibc's arenas keep what is
freed, and tensors of slightly different sizes (batches of different padded
lengths) do not fit exactly into the holes earlier ones left, so the heap's
touched-but-free pages grow with every batch while the memory in use stays flat.
Measured on the GPT-2-small-shape benchmark (``benchmarks/bench_memory.py``):
in use 260 MiB throughout, free-but-resident pages 440 -> 850 MiB over 32 batches.

:class:`HeapBound` bounds that growth: after each batch it reads the process's
resident anonymous memory (one read of ``/proc/self/statm``, a few microseconds)
and, when it has grown by more than ``slack`` bytes since the last release (not
counting the writer's own shard buffers, :meth:`HeapBound.hold`), calls
``malloc_trim(0)``, which returns every whole free page of every arena to the OS
(``madvise(MADV_DONTNEED)``); what is in use is untouched. The level it bounds is
measured after the first batch, and again after the first batch that follows a
release, so the pages every batch touches (the model's working set) are not taken
for growth. Peak memory is then
that level plus the buffers plus ``slack``, whatever the number of prompts. A release
costs the page faults of touching those pages again (less than the per-allocation
faults of a low ``M_MMAP_THRESHOLD``, which would turn every large tensor of the
model into a fresh mapping); nothing changes the allocator's settings for the
process outside an ingest. :func:`adapt_thresholds` (called once as an ingest starts) moves glibc's own
adaptive thresholds where they would go after the first large free, so that the
model's per-layer temporaries reuse heap pages from the first batch, and
:func:`keep_heap_top` (around the ingest's batches) stops glibc giving the top of the
heap back between two batches, which the next batch would fault in again
(:class:`HeapBound` bounds the heap instead). On other platforms (no ``/proc``, no
glibc) they do nothing.

Example
-------
>>> bound = HeapBound(slack=256 << 20)
>>> bound.after_batch() in (True, False)
True
>>> release_freed_memory()
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = [
    "DEFAULT_SLACK",
    "HeapBound",
    "adapt_thresholds",
    "keep_heap_top",
    "release_freed_memory",
    "resident_anon_bytes",
    "slack_from_env",
]

DEFAULT_SLACK = 256 << 20
"""Bytes the resident memory may grow between two releases (256 MiB) unless
``$ACTSTORE_HEAP_SLACK_MIB`` says otherwise (a larger bound releases less often: fewer
page faults, a higher peak; ``benchmarks/bench_memory.py`` measures both)."""


def slack_from_env() -> int:
    """The bound in bytes: ``$ACTSTORE_HEAP_SLACK_MIB`` MiB if set, else :data:`DEFAULT_SLACK`.

    Example
    -------
    >>> slack_from_env() > 0
    True
    """
    raw = os.environ.get("ACTSTORE_HEAP_SLACK_MIB")
    if raw is None:
        return DEFAULT_SLACK
    if not raw.strip().isdigit():
        from actstore.errors import InputError

        raise InputError(
            f"ACTSTORE_HEAP_SLACK_MIB={raw!r} is not a whole number of MiB; set it to e.g. 512"
        )
    return int(raw) << 20


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (glibc, not another libc)
    except (OSError, AttributeError):
        return None
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    return libc


_LIBC = _glibc()
_MALLOC_TRIM: Callable[[int], int] | None = None if _LIBC is None else _LIBC.malloc_trim


def release_freed_memory() -> None:
    """Give every whole free page of glibc's arenas back to the OS (``malloc_trim(0)``).

    The writer's own shard buffers are allocated once and reused (see
    :class:`actstore.store.shard_buffer.HookBuffer`); this returns what the batches'
    transient arrays freed. A no-op without glibc.

    Example
    -------
    >>> release_freed_memory()
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def resident_anon_bytes() -> int | None:
    """The process's resident memory not backed by files (``statm`` resident - shared), or None.

    Example
    -------
    >>> n = resident_anon_bytes()
    >>> n is None or n > 0
    True
    """
    try:
        with open("/proc/self/statm", "rb") as f:
            fields = f.read().split()
    except OSError:
        return None
    return (int(fields[1]) - int(fields[2])) * _PAGE


_THRESHOLD_MAX = (4 << 20) * ctypes.sizeof(ctypes.c_long)  # glibc's DEFAULT_MMAP_THRESHOLD_MAX
_adapted = False


def adapt_thresholds() -> bool:
    """Bring glibc's adaptive heap thresholds to their maximum now; True if it did.

    glibc serves a request above its mmap threshold (initially 128 KiB) with a
    fresh mapping, and gives the top of the heap back to the OS whenever more
    than its trim threshold (twice the other) is free there. Each time a mapped
    block of up to 32 MiB is freed it raises both to that block's size. Until a
    large enough block happens to be freed, a transformer's forward pass (its
    MLP's temporaries are about 50 MiB per layer for a batch of 1,024
    GPT-2-small tokens) touches fresh pages every layer: 147,000 page faults
    (575 MiB) per batch in some processes, about 10-15% of the bare forward pass's
    time on the benchmark machine (more in a first pass), against none to a few
    thousand once the thresholds are up, whichever of the two runs.
    This frees one mapped block just under 32 MiB (never touched, so it costs
    no memory), which is what glibc itself does on the first such free: the
    thresholds stay adaptive (no ``mallopt``), the memory flat
    (:class:`HeapBound` still bounds the heap). Once per process; a no-op
    without glibc, and changes nothing where something set a threshold (``mallopt``,
    or glibc's ``MALLOC_TRIM_THRESHOLD_``-style environment variables).

    Example
    -------
    >>> adapt_thresholds() in (True, False)
    True
    """
    global _adapted
    if _adapted:
        return False
    _adapted = True
    if _LIBC is None:
        return False
    block = _LIBC.malloc(_THRESHOLD_MAX - 2 * _PAGE)  # its chunk: at most the maximum
    if not block:
        return False
    _LIBC.free(block)
    return True


_M_TRIM_THRESHOLD = -1  # mallopt's parameter number
_ADAPTED_TRIM = 2 * (_THRESHOLD_MAX - _PAGE)  # glibc's trim threshold after adapt_thresholds
_KEPT_TRIM = (1 << 31) - 1  # mallopt's largest: malloc_trim(0) (HeapBound) still releases
_keep_lock = threading.Lock()
_keep_depth = 0


def _heap_serves(nbytes: int) -> bool:
    """True if glibc serves an ``nbytes`` block from the heap (not a fresh mapping)."""
    assert _LIBC is not None
    try:
        info = _LIBC.mallinfo2
    except AttributeError:  # glibc < 2.33: cannot tell, so change nothing
        return False
    info.restype = _MallInfo2
    before = info().hblkhd  # bytes in mapped blocks (a model's largest tensors may be some)
    block = _LIBC.malloc(nbytes)  # never touched: costs no memory
    if not block:
        return False
    mapped = info().hblkhd - before
    _LIBC.free(block)
    return mapped < nbytes  # a mapped block would count whole in hblkhd


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def _set_trim(nbytes: int) -> bool:
    assert _LIBC is not None
    return bool(_LIBC.mallopt(_M_TRIM_THRESHOLD, nbytes))


@contextmanager
def keep_heap_top() -> Iterator[bool]:
    """Inside, glibc keeps the freed top of its heap; yields True if it changed anything.

    With its thresholds adapted (:func:`adapt_thresholds`), glibc gives the top of
    the main heap back to the OS whenever more than 64 MiB is free there. A forward
    pass frees about that much at the top after every layer or batch (a GPT-2-small
    layer's MLP temporaries for 1,024 tokens are about 50 MiB; the captured
    activations the ingest keeps shift where they land), so in some processes every
    batch gave its pages back and faulted them in again: 0.4-2.1M page faults per
    256-prompt run on the benchmark machine, against about 60k for the bare forward
    pass (0.2-0.3M inside this context, a release of the bound included). Inside
    this context the trim threshold is out of reach, so freed pages stay for the
    next batch; :class:`HeapBound` (the writer's, ``malloc_trim(0)``) still bounds
    what they add up to. On leaving, the threshold goes back to the value
    glibc itself sets after :func:`adapt_thresholds`. Nothing changes where glibc's
    thresholds are not adaptive (set by ``mallopt`` or ``MALLOC_*_`` environment
    variables: a 20 MiB block is then not served from the heap), nor without glibc.
    Nested or concurrent uses share one change; the last to leave restores it.

    Example
    -------
    >>> with keep_heap_top() as kept:
    ...     kept in (True, False)
    True
    """
    global _keep_depth
    with _keep_lock:
        changed = _keep_depth > 0
        if _keep_depth == 0 and _LIBC is not None and _adapted and _heap_serves(20 << 20):
            changed = _set_trim(_KEPT_TRIM)
        if changed:
            _keep_depth += 1
    try:
        yield changed
    finally:
        if changed:
            with _keep_lock:
                _keep_depth -= 1
                if _keep_depth == 0:
                    _set_trim(_ADAPTED_TRIM)


class HeapBound:
    """Release freed heap pages whenever resident memory grew by more than ``slack``.

    Parameters
    ----------
    slack
        Bytes of growth allowed between releases (default :func:`slack_from_env`).

    Example
    -------
    >>> b = HeapBound(slack=-1)
    >>> b.after_batch(), b.after_batch()  # the first batch measures; then past a negative bound
    (False, True)
    """

    def __init__(self, slack: int | None = None) -> None:
        self.slack = slack_from_env() if slack is None else slack
        self.releases = 0
        self._held = 0
        self._base = 0  # the level bounded, measured by after_batch
        # the first batch measures the level (again after a release: it only comes down)
        self._rebase = True

    def hold(self, nbytes: int) -> None:
        """The owner now keeps ``nbytes`` in use (its shard buffers): not counted as growth.

        A writer's buffers are in use, not freed, so touching them is not what the
        bound is for; without this, filling the first shard (288 MiB of buffers for
        12 hooks x 768 float16, where the layout is not streamed) set off releases
        that only made the model fault its freed pages in again. Peak memory is then
        the level it measured plus the held bytes plus ``slack``.

        Example
        -------
        >>> b = HeapBound(slack=0); b.hold(1 << 40); b.after_batch()
        False
        """
        self._held = nbytes

    def after_batch(self) -> bool:
        """Release if memory grew past the bound; True if it released (or cannot measure).

        The first batch measures the level instead: the pages its work touched (the
        model's working set, the same every batch) are in use, not growth, so a
        release waits for real growth rather than taking them back each time. The
        first batch after a release measures again, and the level only comes down
        (unless the trimmed heap itself is past the bound), so the peak of a long run
        does not creep up release by release.

        Example
        -------
        >>> b = HeapBound(slack=1 << 40)
        >>> b.after_batch(), b.after_batch()  # the level, then within the bound
        (False, False)
        """
        now = resident_anon_bytes()
        if now is None:
            return True
        if self._rebase:
            self._rebase = False
            level = now - self._held
            # after a release the level only comes down: the batch that measures it lands
            # wherever that moment's work leaves it, and a higher one would let the peak
            # creep up release by release; unless the trimmed heap itself sits past the
            # bound (then that is the level, rather than a release every batch)
            if self.releases == 0 or level > self._base + self.slack:
                self._base = level
            else:
                self._base = min(self._base, level)
            return False
        if now - self._held - self._base <= self.slack:
            return False
        self.release()
        return True

    def release(self) -> None:
        """Release now; the next :meth:`after_batch` measures the level to bound.

        Example
        -------
        >>> HeapBound().release()
        """
        release_freed_memory()
        self.releases += 1
        self._rebase = True
