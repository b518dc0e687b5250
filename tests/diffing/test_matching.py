"""Feature matching across SAEs: a permuted SAE is recovered exactly; the optimum is the optimum."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from sae_lens import StandardSAE
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.standard_sae import StandardSAEConfig

import actstore
from actstore.diffing.matching import match_decoders, match_features, unit_rows
from actstore.errors import ActstoreError
from actstore.ingest.saes import SAESpec, load_sae
from actstore.store import objects

HOOK = "blocks.2.hook_resid_post"
D_IN, D_SAE = 64, 48


def _sae(seed: int, d_in: int = D_IN) -> StandardSAE:
    sae = StandardSAE(
        StandardSAEConfig(d_in=d_in, d_sae=D_SAE, metadata=SAEMetadata(hook_name=HOOK))
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return sae.eval()


def _register(store, path, name: str) -> None:
    s = load_sae(SAESpec(path=str(path), name=name), "cpu")
    objects.add_sae(
        store,
        name=name,
        source=s.source,
        hook=s.hook,
        layer=s.layer,
        d_in=s.d_in,
        d_sae=s.d_sae,
        architecture=s.architecture,
        weights_hash=s.weights_hash,
        config=s.cfg,
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store of its own: matching reads only the SAEs' records and weights."""
    return actstore.open(tmp_path_factory.mktemp("match_store") / "store", create=True)


@pytest.fixture(scope="module")
def saes(store, tmp_path_factory):
    root = tmp_path_factory.mktemp("match_saes")
    perm = np.random.default_rng(1).permutation(D_SAE)
    sae = _sae(0)
    sae.save_model(root / "a")
    permuted = _sae(0)
    with torch.no_grad():  # feature j of the copy is feature perm[j] of the original
        permuted.W_dec.copy_(sae.W_dec[perm])
        permuted.W_enc.copy_(sae.W_enc[:, perm])
        permuted.b_enc.copy_(sae.b_enc[perm])
    permuted.save_model(root / "a_permuted")
    _sae(2).save_model(root / "other")
    _sae(3, d_in=32).save_model(root / "narrow")
    for n in ("a", "a_permuted", "other", "narrow"):
        _register(store, root / n, f"match_{n}")
    return {"perm": perm, "sae": sae, "root": root}


def test_an_sae_against_its_permutation_recovers_the_permutation(store, saes):
    m = match_features(store, "match_a", "match_a_permuted", replace=True)
    t = m.table().df()
    # feature i of A is feature j of the copy where perm[j] == i
    inverse = np.argsort(saes["perm"])
    np.testing.assert_array_equal(t["feature_b"].to_numpy(), inverse)
    np.testing.assert_array_equal(t["nearest_b"].to_numpy(), inverse)
    np.testing.assert_allclose(t["cosine"].to_numpy(), 1.0, atol=1e-6)
    assert t["mutual"].all() and m.mean_cosine == pytest.approx(1.0) and m.frac_above_0_9 == 1.0
    q = store.sql(
        """SELECT count(*) FROM feature_matches f JOIN analyses a USING (analysis_id)
           WHERE a.name = 'match:match_a->match_a_permuted' AND f.cosine > 0.99""",
    ).fetchall()
    assert q == [(D_SAE,)]


def test_matching_is_the_optimum_by_brute_force():
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    cos = unit_rows(A) @ unit_rows(B).T
    best = max(itertools.permutations(range(6)), key=lambda p: cos[range(6), list(p)].sum())
    m = match_decoders(A, B)
    assert m["feature_b"].tolist() == list(best)
    np.testing.assert_allclose(m["nearest_cosine"], cos.max(1))
    # more features in A than in B: the extra ones are left unmatched
    m2 = match_decoders(A, B[:4])
    assert (m2["feature_b"] >= 0).sum() == 4 and np.isnan(m2["cosine"]).sum() == 2


def test_two_random_saes_do_not_match_well(store, saes):
    m = match_features(store, "match_a", "match_other", replace=True)
    assert m.mean_cosine < 0.6 and m.frac_above_0_9 == 0.0


@pytest.mark.parametrize(
    "a, b, match",
    [
        ("match_a", "nope", "no SAE named 'nope'"),
        ("match_a", "match_narrow", "width 64 but 'match_narrow' to 32"),
    ],
)
def test_bad_requests_are_refused(store, saes, a, b, match):
    with pytest.raises(ActstoreError, match=match):
        match_features(store, a, b, name="bad")
    assert not store.sql("SELECT * FROM analyses WHERE name = 'bad'").fetchall()


def test_name_clash_is_refused(store, saes):
    match_features(store, "match_a", "match_other", name="clash", replace=True)
    with pytest.raises(ActstoreError, match="already stored"):
        match_features(store, "match_a", "match_other", name="clash")
