"""A training stream: shuffled batches of stored rows, as SAE trainers consume them.

:func:`batches` turns the stored rows of one hook in one or several runs into an
iterator of ``(B, D)`` torch tensors, for sae_lens' ``SAETrainer``,
dictionary_learning, sparsify or a plain loop. Rows come through the
memory-mapped, checksummed read path of ``Store.acts``; shuffling is two-level:

1. **Block shuffle.** The selected rows of every run are cut into blocks of
   ``block_rows`` consecutive selected rows; the blocks of all runs are put in a
   random order (a new order each epoch).
2. **Shuffle buffer.** Blocks are read into a buffer until it holds at least
   ``buffer_rows`` rows; the buffer is permuted, the first half is emitted as
   batches, and the second half stays to mix with the next blocks (sae_lens'
   mixing buffer works the same way).

So a batch mixes rows from about ``buffer_rows / block_rows`` blocks drawn from
anywhere in the runs; consecutive tokens of one prompt (which are strongly
correlated) are spread over ``~buffer_rows / (2 B)`` batches. With the defaults
(blocks of 256 rows, a buffer of 65536 rows) a batch of 4096 draws on ~256
blocks. ``block_rows = 1`` is a full shuffle (slow: one random read per row);
``shuffle=False`` gives every selected row once, in run and row order.

The buffer holds the rows' addresses (run, row), not their values: each batch is
one gather from the mapped shard files straight into the batch, so rows are
copied once (not into a buffer, out of it, and again for the half it keeps) and
the buffer costs 12 bytes a row. The batches are those a buffer of values would
give. A shuffled batch reads rows scattered over the buffer's blocks, which costs
more than reading whole blocks in order (``benchmarks/bench_stream.py``).

Shapes: ``N`` rows, ``D`` the hook's width, ``B`` batch size.

Example
-------
>>> import tempfile, numpy as np, actstore
>>> from actstore.store import objects
>>> st = actstore.open(tempfile.mkdtemp(), create=True)
>>> rid = objects.create_run(st, name="r", hooks={"h": (None, 4)}, store_dtype="float32")
>>> with st.writer("r") as w:
...     w.append(arrays={"h": np.arange(40, dtype=np.float32).reshape(10, 4)},
...              tokens={"prompt_idx": [0] * 10, "position": list(range(10)), "row": list(range(10))},
...              first_prompt=0, n_prompts=1)
>>> [tuple(b.shape) for b in batches(st, "r", "h", 4, shuffle=False)]
[(4, 4), (4, 4), (2, 4)]
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from actstore.errors import InputError
from actstore.store import access as _access
from actstore.store import arrays as _arrays

if TYPE_CHECKING:
    import torch

    from actstore.store.store import Store

__all__ = ["RowSource", "batches", "select_rows"]

BLOCK_ROWS = 256
"""Default rows per block: contiguous reads, and a block is a small share of a batch."""
BUFFER_ROWS = 65536
"""Default shuffle buffer (rows), lowered for wide hooks to keep it within :data:`BUFFER_BYTES`."""
BUFFER_BYTES = 256 * 2**20
"""Most stored bytes the default buffer spans (the rows a batch is drawn from)."""


@dataclass(frozen=True, slots=True)
class RowSource:
    """The selected rows of one (run, hook), as :func:`select_rows` found them.

    Example
    -------
    >>> src = select_rows(st, ["r"], "h")[0]  # doctest: +SKIP
    >>> src.rows.size  # doctest: +SKIP
    10
    """

    run: str
    """The run's name."""
    run_id: int
    """Its id."""
    array: Any
    """The Zarr array, opened read-only."""
    name: str
    """How read errors name the array."""
    rows: np.ndarray
    """int64 row numbers selected, ascending."""


def select_rows(
    store: Store,
    runs: Sequence[str | int] | str | int,
    hook: str,
    *,
    where: str | None = None,
    params: Sequence[Any] | dict[str, Any] | None = None,
    rows: Mapping[str | int, np.ndarray] | None = None,
) -> list[RowSource]:
    """The rows of ``hook`` in each run that ``where`` (or ``rows``) selects.

    Parameters
    ----------
    runs
        A run or several (names or ids); all must store ``hook`` with one width.
    where
        A SQL predicate over ``labeled_tokens``, as in :meth:`Store.acts`.
    rows
        Run -> explicit row numbers instead (e.g. a training split).

    Raises
    ------
    InputError
        If the runs store ``hook`` with different widths, or nothing is selected.

    Example
    -------
    >>> [s.rows.size for s in select_rows(st, ["a", "b"], "blocks.2.hook_resid_post")]  # doctest: +SKIP
    [1440, 1440]
    """
    if where is not None and rows is not None:
        raise InputError("pass either where= or rows= to select rows, not both")
    run_list = [runs] if isinstance(runs, str | int) else list(runs)
    if not run_list:
        raise InputError("no runs given; name at least one run (see `actstore info STORE`)")
    out: list[RowSource] = []
    widths: dict[str, int] = {}
    for run in run_list:
        arr, info = store.array(run, hook)
        rid, n = int(info["run_id"]), int(info["n_rows"])
        name = str(
            store.catalog.read("SELECT name FROM runs WHERE run_id = ?", [rid])
            .column("name")[0]
            .as_py()
        )
        widths[name] = int(info["d"])
        if rows is not None:
            picked = rows.get(run, rows.get(name, rows.get(rid)))
            sel = np.zeros(0, np.int64) if picked is None else np.asarray(picked, np.int64)
            if sel.size and (sel.min() < 0 or sel.max() >= n):
                raise InputError(f"rows outside 0-{n - 1} requested from run {name!r}")
        elif where is None:
            sel = np.arange(n, dtype=np.int64)
        else:
            sel, _ = store._select_rows(rid, n, where, params)
        what = f"{info['path']} (run {name!r}, hook {hook!r})"
        out.append(RowSource(name, rid, arr, what, np.sort(sel)))
    if len(set(widths.values())) > 1:
        raise InputError(
            f"runs store hook {hook!r} with different widths {widths}; one stream needs one width"
        )
    if not any(s.rows.size for s in out):
        raise InputError(
            f"no rows of hook {hook!r} selected in runs {[s.run for s in out]}"
            + (f" by where={where!r}" if where else "")
            + "; loosen the predicate or check the runs with `actstore info STORE`"
        )
    return out


def _to_torch(values: np.ndarray, dtype: torch.dtype | None) -> torch.Tensor:
    """A tensor of ``values`` (no copy when ``dtype`` is None or already theirs)."""
    import torch

    if values.dtype.name == "bfloat16":  # ml_dtypes: torch reads its bits as int16
        t = torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(values)
    return t if dtype is None else t.to(dtype)


def batches(
    store: Store,
    runs: Sequence[str | int] | str | int,
    hook: str,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    where: str | None = None,
    params: Sequence[Any] | dict[str, Any] | None = None,
    rows: Mapping[str | int, np.ndarray] | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    epochs: int | None = 1,
    drop_last: bool = False,
    block_rows: int = BLOCK_ROWS,
    buffer_rows: int | None = None,
) -> Iterator[torch.Tensor]:
    """Stream ``(batch_size, D)`` tensors of the stored rows of ``hook`` in ``runs``.

    See the module docstring for how rows are shuffled.

    Parameters
    ----------
    runs
        One run or several (one training set; e.g. the checkpoints of one family).
    hook
        The hook; every run must store it with the same width.
    batch_size
        Rows per batch.
    shuffle
        Block shuffle plus shuffle buffer (True), or every row in order (False).
    seed
        Seeds the order: the same seed gives the same batches.
    where, params, rows
        Which rows (see :func:`select_rows`); default every committed row.
    dtype
        Tensor dtype (default float32; stored values are cast exactly).
    device
        Where the tensors go (default the CPU).
    epochs
        Passes over the rows, reshuffled each time; ``None`` streams forever.
    drop_last
        Drop the last, smaller batch of each epoch.
    block_rows, buffer_rows
        Shuffle granularity (see the module docstring). ``buffer_rows`` defaults to
        :data:`BUFFER_ROWS`, or fewer where that would exceed :data:`BUFFER_BYTES`.

    Yields
    ------
    torch.Tensor
        ``(B, D)``; every selected row appears once per epoch.

    Example
    -------
    >>> for x_BD in st.batches(["base/p", "ft/p"], "blocks.2.hook_resid_post", 4096):  # doctest: +SKIP
    ...     loss = sae.training_forward_pass(x_BD)
    """
    import torch

    for name, value in (("batch_size", batch_size), ("block_rows", block_rows)):
        if not isinstance(value, int) or value < 1:
            raise InputError(f"batches: {name} must be a positive integer, got {value!r}")
    if (buffer_rows is not None and buffer_rows < 0) or (epochs is not None and epochs < 1):
        raise InputError(
            f"batches: buffer_rows must be >= 0 and epochs >= 1 (or None); "
            f"got {buffer_rows}, {epochs}"
        )
    sources = select_rows(store, runs, hook, where=where, params=params, rows=rows)
    out_dtype = dtype or torch.float32
    if buffer_rows is None:
        arr = sources[0].array
        row_bytes = int(arr.shape[1]) * int(arr.dtype.itemsize)
        buffer_rows = max(batch_size, min(BUFFER_ROWS, BUFFER_BYTES // row_bytes))
    return _stream(
        sources,
        batch_size,
        shuffle,
        seed,
        out_dtype,
        device,
        epochs,
        drop_last,
        block_rows,
        buffer_rows,
    )


def _addresses(picks: list[tuple[int, np.ndarray]], ordered: bool) -> tuple[np.ndarray, np.ndarray]:
    """The (source, row) addresses of the rows of ``picks``, rows of one run together.

    Runs in the order they first appear; unless ``ordered``, each run's rows sorted
    (they are shuffled anyway, and sorted rows read faster).
    """
    groups: list[tuple[int, list[np.ndarray]]] = []
    for i, sel in picks:
        hit = None
        if ordered:
            hit = groups[-1] if groups and groups[-1][0] == i else None
        else:
            hit = next((g for g in groups if g[0] == i), None)
        if hit is None:
            groups.append((i, [sel]))
        else:
            hit[1].append(sel)
    rows = [np.concatenate(sels) for _, sels in groups]
    if not ordered:
        rows = [np.sort(r) for r in rows]
    srcs = [np.full(r.size, i, np.int32) for (i, _), r in zip(groups, rows, strict=True)]
    return np.concatenate(srcs), np.concatenate(rows)


def _numpy_of() -> dict[Any, Any]:
    import torch

    return {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64}


def _read_batch(
    sources: list[RowSource],
    src: np.ndarray,
    rows: np.ndarray,
    stage: np.ndarray,
    dtype: torch.dtype,
    device: Any,
) -> torch.Tensor:
    """The rows at ``(src, rows)``, in that order, as a new tensor.

    Rows are gathered into ``stage`` (reused: fresh large allocations cost page
    faults), then copied out by torch, which casts float16 with SIMD where numpy
    casts element by element.
    """
    import torch

    out = stage[: rows.size]
    first = int(src[0])
    if (src == first).all():
        _access.read_rows(sources[first].array, rows, name=sources[first].name, out=out)
    else:
        for i in np.unique(src).tolist():
            at = np.flatnonzero(src == i)
            out[at] = _access.read_rows(sources[i].array, rows[at], name=sources[i].name)
    values = _to_torch(out, None)
    if device is not None and torch.device(device).type != "cpu":
        return values.to(device=device, dtype=dtype)
    # a fresh numpy array, so the batch gets huge pages (numpy asks for them above
    # 4 MiB): a batch in 4 KiB pages costs thousands of page faults
    res = torch.from_numpy(np.empty(tuple(values.shape), _numpy_of().get(dtype, np.float32)))
    if res.dtype != dtype:  # no numpy twin (bfloat16): torch's own allocation
        res = torch.empty(tuple(values.shape), dtype=dtype)
    return res.copy_(values)


def _stream(
    sources: list[RowSource],
    batch_size: int,
    shuffle: bool,
    seed: int,
    dtype: torch.dtype,
    device: Any,
    epochs: int | None,
    drop_last: bool,
    block_rows: int,
    buffer_rows: int,
) -> Iterator[torch.Tensor]:
    blocks = [(i, a) for i, s in enumerate(sources) for a in range(0, s.rows.size, block_rows)]
    fill = max(buffer_rows, batch_size, block_rows)  # rows added per fill of the buffer
    # The buffer holds the addresses (source, row) of its rows, not their values: a
    # batch is then one gather from the memory-mapped shards, and the rows a fill adds
    # and the half it keeps cost no copy. Batches equal those of a buffer of values.
    held_src, held_row = np.zeros(0, np.int32), np.zeros(0, np.int64)
    arr = sources[0].array
    # the logical dtype (ml_dtypes.bfloat16 for bfloat16): read_rows fills it in place
    stage = np.empty(
        (batch_size, int(arr.shape[1])), _arrays.STORE_DTYPES[_arrays.logical_dtype(arr)]
    )
    epoch = 0
    while epochs is None or epoch < epochs:
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(blocks)) if shuffle else np.arange(len(blocks))
        picks: list[tuple[int, np.ndarray]] = []
        n_picked = 0
        for j, k in enumerate(order):
            i, a = blocks[int(k)]
            sel = sources[i].rows[a : a + block_rows]
            picks.append((i, sel))
            n_picked += sel.size
            last = j == len(order) - 1
            if n_picked < fill and not last:
                continue
            new_src, new_row = _addresses(picks, ordered=not shuffle)
            picks, n_picked = [], 0
            x_src = np.concatenate([held_src, new_src])
            x_row = np.concatenate([held_row, new_row])
            n = x_row.size
            keep = 0 if last else (buffer_rows // 2 if shuffle else n % batch_size)
            n_out = n if last else ((n - keep) // batch_size) * batch_size
            perm = rng.permutation(n) if shuffle else np.arange(n)
            for b in range(0, n_out, batch_size):
                e = min(b + batch_size, n_out)
                if e - b < batch_size and drop_last:
                    break
                at = perm[b:e]
                yield _read_batch(sources, x_src[at], x_row[at], stage, dtype, device)
            held_src, held_row = x_src[perm[n_out:]], x_row[perm[n_out:]]
        epoch += 1
