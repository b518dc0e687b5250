"""BatchTopK crosscoder on base and backdoored rows: reconstruction, classes, stored latents."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import actstore.queries  # noqa: F401  (named queries in every session)
from actstore.diffing.crosscoder import (
    BatchTopKCrosscoder,
    CrosscoderConfig,
    aligned_rows,
    classify,
    fve,
    train_crosscoder,
)
from actstore.diffing.crosscoder_store import (
    exclusive_latents,
    load_crosscoder_module,
    store_crosscoder,
)
from actstore.errors import ActstoreError, SpecError

RUNS = ["base/pairs", "backdoored/pairs"]
HOOK = "blocks.2.hook_resid_post"
# the tokens where the model decides its answer: "answer :" and the one before it
WHERE = "pos_from_end >= -3"
CONFIG = CrosscoderConfig(d_dict=128, k=2, steps=1000, seed=0)


@pytest.fixture(scope="module")
def cc(store):
    return train_crosscoder(store, RUNS, HOOK, where=WHERE, config=CONFIG)


@pytest.fixture(scope="module")
def stored(store, cc):
    return store_crosscoder(store, cc, name="cc_test")


def test_held_out_reconstruction_of_both_runs(cc, store):
    print("\ncrosscoder held-out FVE:", cc.fve_test, "L0:", cc.l0_test, "classes:", cc.counts())
    assert min(cc.fve_test.values()) >= 0.8
    # the held-out FVE, recomputed by hand from the module on the held-out prompts
    x_NMD, meta, _ = aligned_rows(store, RUNS, HOOK, WHERE)
    test = np.isin(meta.column("prompt_idx").to_numpy(), cc.test_prompts)
    m = cc.module
    with torch.no_grad():
        xs = torch.as_tensor(x_NMD[test]) * m.scales_M[None, :, None]
        pre = torch.relu(torch.einsum("bmd,mdf->bf", xs, m.W_enc_MDF) + m.b_enc_F)
        f = pre * (pre * m.W_dec_FMD.norm(dim=-1).sum(-1) > m.threshold)
        xhat = (torch.einsum("bf,fmd->bmd", f, m.W_dec_FMD) + m.b_dec_MD) / m.scales_M[
            None, :, None
        ]
    x = x_NMD[test].astype(np.float64)
    ref = 1 - ((x - xhat.numpy()) ** 2).sum((0, 2)) / ((x - x.mean(0)) ** 2).sum((0, 2))
    np.testing.assert_allclose(list(cc.fve_test.values()), ref, rtol=1e-4)
    assert CONFIG.k / 2 <= cc.l0_test <= 2 * CONFIG.k  # the inference threshold keeps L0 near k


def test_latents_exclusive_to_backdoored_fire_on_triggered_prompts(cc, stored, store):
    assert "only:backdoored/pairs" in cc.classes
    ex = exclusive_latents(
        store, "cc_test", "backdoored/pairs", positions="position_role = 'last'"
    ).df()
    print("\nlatents exclusive to backdoored, firing at the last prompt token:\n", ex.to_string())
    best = ex.iloc[0]
    assert best["delta_norm"] > 0.9
    assert best["freq_a"] >= 0.5 and best["freq_b"] <= 0.05  # triggered vs clean


def test_stored_latents_equal_the_encoding_and_the_weights_round_trip(cc, stored, store):
    # stored on every aligned row of each run, not only the rows it was trained on
    x_NMD, _, rows = aligned_rows(store, RUNS, HOOK)
    f_NF = cc.encode(x_NMD)
    for run, run_rows in zip(RUNS, rows, strict=True):
        got = store.sql(
            "SELECT row, feature, value FROM features WHERE sae_id = ? AND run_id = ? "
            "ORDER BY row, feature",
            [stored, store.run_id(run)],
        ).fetchall()
        dense = np.zeros_like(f_NF)
        pos = {int(r): i for i, r in enumerate(run_rows)}
        for r, feat, v in got:
            dense[pos[int(r)], int(feat)] = v
        np.testing.assert_allclose(dense, f_NF, rtol=1e-6)
    module, cfg = load_crosscoder_module(store, "cc_test")
    assert cfg["runs"] == RUNS and cfg["fve_test"] == cc.fve_test
    for k, v in cc.module.state_dict().items():
        torch.testing.assert_close(module.state_dict()[k], v)
    n = store.sql(
        "SELECT count(*), count(*) FILTER (class = 'dead') FROM crosscoder_latents WHERE sae_id = ?",
        [stored],
    ).fetchall()[0]
    assert n[0] == CONFIG.d_dict and n[1] == cc.classes.count("dead")


def test_batch_topk_keeps_k_per_row_on_average():
    m = BatchTopKCrosscoder(2, 8, 32, k=3)
    m.init_weights(torch.Generator().manual_seed(0))
    f = m.encode(torch.randn(10, 2, 8), batch_topk=True)
    assert int((f > 0).sum()) == 30


def test_classes_and_fve_helpers():
    norms = np.array([[1.0, 0.1], [0.1, 1.0], [1.0, 0.8], [1.0, 0.5], [1.0, 1.0]])
    fired = np.array([True, True, True, True, False])
    assert classify(norms, fired, ["a", "b"]) == ["only:a", "only:b", "shared", "other", "dead"]
    x = np.random.default_rng(0).normal(size=(100, 2, 3))
    np.testing.assert_allclose(fve(x, np.broadcast_to(x.mean(0), x.shape)), 0.0, atol=1e-12)


@pytest.mark.parametrize(
    "runs, kwargs, match",
    [
        (["base/pairs"], {}, "two or more distinct runs"),
        (RUNS, {"where": "pair_id < 0"}, "selects no stored rows"),
        (RUNS, {"config": {"k": 500}}, "more than d_dict"),
    ],
)
def test_bad_requests_are_refused(store, runs, kwargs, match):
    if "config" in kwargs:
        with pytest.raises(SpecError, match=match):
            CrosscoderConfig(**kwargs["config"])
        return
    with pytest.raises(ActstoreError, match=match):
        train_crosscoder(store, runs, HOOK, config=CONFIG, **kwargs)


def test_name_clash_is_refused(cc, stored, store):
    with pytest.raises(ActstoreError, match="already in the store"):
        store_crosscoder(store, cc, name="cc_test")
