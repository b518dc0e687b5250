"""What a merge of shard stores carries besides runs: derived checkpoints and token diffs.

An ingest writes two catalog tables of the diffing work beside its runs:

* ``derived_checkpoints`` (:mod:`actstore.ingest.derived`): the recipe of each
  checkpoint a job built from weights, keyed by ``checkpoint_id``; the merge copies
  each shard checkpoint's row under the merged checkpoint's id (once), so the merged
  store can rebuild the model (``load_derived``) as a single ingest's can;
* ``token_diffs`` made in the capture pass (:mod:`actstore.ingest.token_kl`): one
  ``analyses`` row per diff (made in the merged store when its run ``b`` is, with the
  merged run ids), and each batch's rows appended in that batch's commit with
  ``analysis_id``, ``run_id_a``, ``run_id_b`` and ``prompt_set_id`` remapped; the
  summary is written when run ``b`` completes.

The other diffing tables (``feature_matches``, ``crosscoder_latents``) are made by
analyses of a finished store, never by an ingest, so shard stores do not hold them
(an analysis of one shard's rows would not be the whole job's anyway).

Example
-------
>>> maps = diff_maps(out, part)  # doctest: +SKIP
>>> w.append(..., other=batch_rows(part, maps, 0, 16))  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa

from actstore.errors import InputError
from actstore.ingest.token_kl import SCHEMA, capture_diffs, record_analysis, taken, with_ids

if TYPE_CHECKING:
    from actstore.ingest.shard_stores import ShardRun, ShardStore
    from actstore.store.store import Store


def _has(store: Store, table: str) -> bool:
    return bool(
        store.sql(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [table]
        ).fetchall()[0][0]
    )


def copy_derived(src: Store, out: Store, src_checkpoint: int, out_checkpoint: int) -> None:
    """Copy a derived checkpoint's recipe row to the merged store (nothing for one with files).

    Example
    -------
    >>> copy_derived(shard_store, out, 4, 4)  # doctest: +SKIP
    """
    from actstore.ingest.derived import TABLE_DDL
    from actstore.store.writer import bump_commit_seq

    if not _has(src, "derived_checkpoints"):
        return
    rows = src.catalog.read(
        "SELECT * FROM derived_checkpoints WHERE checkpoint_id = ?", [src_checkpoint]
    )
    if not rows.num_rows:
        return
    rows = rows.set_column(
        0, "checkpoint_id", pa.array([out_checkpoint] * rows.num_rows, pa.int32())
    )
    with out.catalog.write() as con:
        con.execute(TABLE_DDL)
        if con.execute(
            "SELECT 1 FROM derived_checkpoints WHERE checkpoint_id = ?", [out_checkpoint]
        ).fetchall():
            return
        con.register("_d", rows)
        cols = ", ".join(f'"{c}"' for c in rows.column_names)
        con.execute(f"INSERT INTO derived_checkpoints ({cols}) SELECT {cols} FROM _d")
        con.unregister("_d")
        bump_commit_seq(con)


def check_diffs(out: Store, stores: Sequence[ShardStore]) -> None:
    """Refuse shards whose token diffs' names are taken in ``out`` by another analysis.

    Example
    -------
    >>> check_diffs(out, stores)  # doctest: +SKIP
    """
    for s in stores:
        for name in s.runs:
            for _, diff, params in capture_diffs(s.store, name):
                if taken(out, diff, params["run_a"], params["run_b"]):
                    raise InputError(
                        f"a token diff named {diff!r} is already in {out.root} and was not made "
                        "by this job; merge into another store"
                    )


@dataclass(frozen=True)
class DiffMap:
    """One capture-pass diff of a shard run: its analysis id there, and the merged ids."""

    src_analysis: int
    analysis_id: int
    run_id_a: int
    run_id_b: int
    prompt_set_id: int


def diff_maps(out: Store, part: ShardRun, run_id: int) -> list[DiffMap]:
    """The merged analyses of a shard run's token diffs (made in ``out`` if new).

    Example
    -------
    >>> diff_maps(out, part, 2)  # doctest: +SKIP
    [DiffMap(src_analysis=1, analysis_id=1, run_id_a=1, run_id_b=2, prompt_set_id=1)]
    """
    maps = []
    name_b = str(part.run["name"])
    pset = int(
        out.sql("SELECT prompt_set_id FROM runs WHERE run_id = ?", [run_id]).fetchall()[0][0]
    )
    for src, diff, params in capture_diffs(part.store, name_b):
        hit = out.sql("SELECT run_id FROM runs WHERE name = ?", [params["run_a"]]).fetchall()
        if not hit:
            raise InputError(
                f"{part.where}: token diff {diff!r} reads run {params['run_a']!r}, which is not "
                f"in {out.root}; merge every run of the job (the shards list them)"
            )
        rid_a = int(hit[0][0])
        prov = json.loads(
            part.store.sql(
                "SELECT provenance FROM analyses WHERE analysis_id = ?", [src]
            ).fetchall()[0][0]
        )
        aid = record_analysis(
            out,
            diff,
            ((params["run_a"], rid_a), (name_b, run_id)),
            prompt_set=str(prov.get("prompt_set")),
            completion=bool(params.get("completion")),
        )
        maps.append(DiffMap(src, aid, rid_a, run_id, pset))
    return maps


def batch_rows(
    part: ShardRun, maps: Sequence[DiffMap], first_prompt: int, end_prompt: int
) -> dict[str, pa.Table] | None:
    """A batch's token-diff rows from a shard, with the merged ids (None: no diffs).

    Example
    -------
    >>> batch_rows(part, maps, 0, 16)["token_diffs"].num_rows  # doctest: +SKIP
    232
    """
    if not maps:
        return None
    cols = ", ".join(f.name for f in SCHEMA)
    tables = []
    for m in maps:
        t = part.store.catalog.read(
            f"""SELECT {cols} FROM token_diffs WHERE analysis_id = ?
                AND prompt_idx >= ? AND prompt_idx < ? ORDER BY prompt_idx, position""",
            [m.src_analysis, first_prompt, end_prompt],
        ).cast(SCHEMA)
        tables.append(with_ids(t, m.analysis_id, m.run_id_a, m.run_id_b, m.prompt_set_id))
    return {"token_diffs": pa.concat_tables(tables)}
