"""SAE decomposition of a direction: an sae_lens SAE saved to disk, registered by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import actstore
from actstore.analysis import get_analysis, sae_decompose
from actstore.analysis.sae import load_decoder
from actstore.errors import InputError, NotFoundError
from actstore.store import objects

HOOK = "blocks.2.hook_resid_post"
D, F = 64, 48


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A StandardSAE with random weights, saved with ``save_model`` (sae_lens' disk format)."""
    torch = pytest.importorskip("torch")
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(0)
    cfg = sae_lens.StandardSAEConfig(d_in=D, d_sae=F, metadata=SAEMetadata(hook_name=HOOK))
    sae = sae_lens.StandardSAE(cfg)
    with torch.no_grad():
        sae.W_dec.normal_()
    path = tmp_path_factory.mktemp("sae") / "sae_l2"
    sae.save_model(path)
    return path


@pytest.fixture
def store(tmp_path, sae_dir):
    st = actstore.open(tmp_path / "s", create=True)
    objects.add_sae(st, name="sae_l2", hook=HOOK, d_in=D, d_sae=F, source=str(sae_dir))
    return st


def test_cosines_match_numpy_and_planted_features_rank_first(store, sae_dir):
    W_dec, hook = load_decoder(sae_dir)
    assert W_dec.shape == (F, D) and hook == HOOK
    v = 2.0 * W_dec[5] / np.linalg.norm(W_dec[5]) - 1.5 * W_dec[7] / np.linalg.norm(W_dec[7])
    objects.add_direction(store, name="d", vector=v, hook=HOOK, method="mean_diff")
    dec = sae_decompose(store, direction="d", sae="sae_l2", k=3, name="dec_d")
    want = W_dec @ v / (np.linalg.norm(W_dec, axis=1) * np.linalg.norm(v))
    np.testing.assert_allclose(dec.cosines, want, atol=1e-6)
    np.testing.assert_allclose(dec.dots, W_dec @ (v / np.linalg.norm(v)), atol=1e-6)
    assert dec.top()[0] == 5 and dec.bottom()[0] == 7
    assert dec.top(5).tolist() == np.argsort(-want)[:5].tolist()
    rows = dec.summary().to_pylist()
    assert len(rows) == 6 and rows[0]["side"] == "top" and rows[3]["side"] == "bottom"
    rec = get_analysis(store, "dec_d")
    assert rec.kind == "sae_decompose" and rec.result["top"][0]["feature"] == 5
    # an array, an object with W_dec and the directory give the same answer
    same = sae_decompose(direction=v, sae=W_dec, save=False)
    np.testing.assert_allclose(same.cosines, dec.cosines, atol=1e-6)
    from_dir = sae_decompose(direction=v, sae=str(sae_dir), save=False)
    np.testing.assert_allclose(from_dir.cosines, dec.cosines, atol=1e-6)


def test_errors(store):
    objects.add_direction(store, name="other", vector=np.ones(D), hook="blocks.0.hook_resid_post")
    with pytest.raises(InputError, match="check_hook=False"):
        sae_decompose(store, direction="other", sae="sae_l2", save=False)
    sae_decompose(store, direction="other", sae="sae_l2", check_hook=False, save=False)
    with pytest.raises(InputError, match="width 3"):
        sae_decompose(store, direction=np.ones(3), sae="sae_l2", save=False)
    with pytest.raises(NotFoundError, match="SAEs: \\['sae_l2'\\]"):
        sae_decompose(store, direction=np.ones(D), sae="nope", save=False)
    objects.add_sae(store, name="remote", hook=HOOK, d_in=D, d_sae=F, source="release/id")
    with pytest.raises(InputError, match="not a local directory"):
        sae_decompose(store, direction=np.ones(D), sae="remote", save=False)
