"""Unembedding of directions through tiny models' final norms, by hand and by the modules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import actstore
from actstore.analysis import get_analysis, unembed
from actstore.errors import InputError, SpecError
from actstore.store import objects
from tests.helpers.tiny import build_tiny_model

D_MODEL = 32


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lens_models")
    return {f: build_tiny_model(f, root / f) for f in ("llama", "gemma", "gpt2")}


def directions(k: int = 3) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((k, D_MODEL))


def test_rmsnorm_scale_applies_the_weight(models):
    model = AutoModelForCausalLM.from_pretrained(models["llama"], dtype=torch.float32)
    V = directions()
    lens = unembed(direction=V, model=model, k=5, save=False)
    g = model.model.norm.weight.detach().double().numpy()
    W_U = model.lm_head.weight.detach().double().numpy()
    np.testing.assert_allclose(lens.logits, (V * g) @ W_U.T, atol=1e-10)
    assert lens.labels == ("v0", "v1", "v2") and lens.tokens is not None  # found via the path
    top = lens.top(1)
    assert [t for t, _, _ in top] == list(np.argsort(-lens.logits[1])[:5])
    assert lens.bottom(1)[0][2] == pytest.approx(lens.logits[1].min())
    assert lens.summary().num_rows == 3 * 2 * 5


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_scale_is_the_full_norm_up_to_the_rms(models, family):
    """For RMSNorm, norm(v) = scale * v / rms(v): checks Gemma's (1 + weight) rule."""
    V = directions()
    scale = unembed(direction=V, model=models[family], norm="scale", save=False).logits
    full = unembed(direction=V, model=models[family], norm="full", save=False).logits
    rms = np.sqrt((V**2).mean(axis=1, keepdims=True))
    np.testing.assert_allclose(full * rms, scale, rtol=1e-4, atol=1e-5)


def test_layernorm(models):
    model = AutoModelForCausalLM.from_pretrained(models["gpt2"], dtype=torch.float32)
    V = directions(2)
    ln = model.transformer.ln_f
    w = ln.weight.detach().double().numpy()
    W_U = model.lm_head.weight.detach().double().numpy()
    scale = unembed(direction=V, model=model, save=False).logits
    np.testing.assert_allclose(scale, ((V - V.mean(1, keepdims=True)) * w) @ W_U.T, atol=1e-10)
    full = unembed(direction=V, model=model, norm="full", save=False).logits
    with torch.no_grad():
        want = model.lm_head(ln(torch.tensor(V, dtype=torch.float32))).double().numpy()
    np.testing.assert_allclose(full, want, atol=1e-5)
    none = unembed(direction=V, model=model, norm="none", save=False).logits
    np.testing.assert_allclose(none, V @ W_U.T, atol=1e-10)


def test_model_from_the_catalog(models, tmp_path):
    st = actstore.open(tmp_path / "s", create=True)
    mid = objects.add_model(st, name="tiny", family="llama", d_model=D_MODEL)
    cid = objects.add_checkpoint(st, model_id=mid, label="base", path=str(models["llama"]))
    rid = objects.create_run(
        st, name="base/x", checkpoint_id=cid, hooks={"blocks.1.hook_resid_post": (1, D_MODEL)}
    )
    v = directions(1)[0]
    objects.add_direction(
        st, name="d", vector=v, hook="blocks.1.hook_resid_post", method="mean_diff", run_id=rid
    )
    lens = unembed(st, direction="d", k=4, name="lens_d")
    assert lens.model == str(models["llama"]) and lens.labels == ("d",)
    assert lens.tokens is not None and all(isinstance(t, str) for _, t, _ in lens.top())
    rec = get_analysis(st, "lens_d")
    assert rec.kind == "unembed" and len(rec.result["directions"][0]["top"]) == 4
    by_run = unembed(st, direction=v, run="base/x", save=False)
    np.testing.assert_allclose(by_run.logits, lens.logits)


def test_errors(models, tmp_path):
    with pytest.raises(InputError, match="width 5"):
        unembed(direction=np.ones(5), model=models["llama"], save=False)
    with pytest.raises(SpecError, match="norm must be"):
        unembed(direction=np.ones(D_MODEL), model=models["llama"], norm="rms", save=False)  # type: ignore[arg-type]
    st = actstore.open(tmp_path / "s", create=True)
    objects.create_run(st, name="r", hooks={"blocks.0.hook_resid_post": (0, D_MODEL)})
    with pytest.raises(InputError, match="no checkpoint path"):
        unembed(st, direction=np.ones(D_MODEL), run="r", save=False)
    with pytest.raises(InputError, match="which model"):
        unembed(st, direction=np.ones(D_MODEL), save=False)
