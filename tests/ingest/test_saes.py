"""SAE loading and sparse encoding (:mod:`actstore.ingest.saes`).

Tiny sae_lens SAEs (``d_in`` 16, ``d_sae`` 64, random weights) of every
inference architecture that needs no download are built and saved with
sae_lens' own ``save_model``, then loaded back through :func:`load_sae`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sae_lens import SAE, JumpReLUSAE, StandardSAE, TopKSAE
from sae_lens.saes.gated_sae import GatedSAE, GatedSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUSAEConfig
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.standard_sae import StandardSAEConfig
from sae_lens.saes.topk_sae import TopKSAEConfig

from actstore.errors import HookNotFoundError, InputError, SpecError
from actstore.ingest.saes import (
    LoadedSAE,
    SAESpec,
    check_sae,
    encode_sparse,
    load_sae,
    weights_hash,
)

D_IN, D_SAE = 16, 64
HOOK = "blocks.2.hook_resid_post"
ARCHITECTURES = ("standard", "topk", "jumprelu", "gated")


def _tiny_sae(arch: str, seed: int = 0) -> SAE:
    meta = SAEMetadata(hook_name=HOOK, model_name="tiny")
    common = {"d_in": D_IN, "d_sae": D_SAE, "metadata": meta}
    sae: SAE
    if arch == "standard":
        sae = StandardSAE(StandardSAEConfig(**common))
    elif arch == "topk":
        sae = TopKSAE(TopKSAEConfig(k=5, **common))
    elif arch == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(**common))
    elif arch == "gated":
        sae = GatedSAE(GatedSAEConfig(**common))
    else:
        raise ValueError(arch)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            if name == "threshold":
                p.abs_()  # JumpReLU thresholds are positive
    return sae.eval()


@pytest.fixture(scope="module")
def sae_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("saes")
    out = {}
    for arch in ARCHITECTURES:
        d = root / f"{arch}_sae"
        _tiny_sae(arch, seed=ARCHITECTURES.index(arch)).save_model(d)
        out[arch] = d
    return out


@pytest.fixture(scope="module")
def loaded(sae_dirs: dict[str, Path]) -> dict[str, LoadedSAE]:
    return {arch: load_sae(SAESpec(path=str(d)), "cpu") for arch, d in sae_dirs.items()}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_load_identity(arch: str, sae_dirs: dict[str, Path], loaded: dict[str, LoadedSAE]) -> None:
    sae = loaded[arch]
    assert sae.name == f"{arch}_sae"
    assert sae.source == str(sae_dirs[arch].resolve())
    assert (sae.hook, sae.layer, sae.d_in, sae.d_sae) == (HOOK, 2, D_IN, D_SAE)
    assert sae.architecture == arch
    assert len(sae.weights_hash) == 32
    assert sae.weights_hash == weights_hash(_tiny_sae(arch, ARCHITECTURES.index(arch)).state_dict())
    assert json.loads(json.dumps(sae.cfg))["metadata"]["hook_name"] == HOOK
    assert next(sae.sae.parameters()).dtype == torch.float32
    record = sae.catalog_record()
    assert record["name"] == sae.name and record["config"] == sae.cfg


def test_weights_hash_distinguishes_saes(loaded: dict[str, LoadedSAE]) -> None:
    hashes = {s.weights_hash for s in loaded.values()}
    assert len(hashes) == len(loaded)
    assert (
        weights_hash(_tiny_sae("standard", seed=9).state_dict()) != loaded["standard"].weights_hash
    )


def test_weights_hash_bfloat16() -> None:
    sd = {"w": torch.ones(3, dtype=torch.bfloat16), "s": torch.tensor(1.0)}
    assert weights_hash(sd) == weights_hash(dict(reversed(sd.items())))


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("block_rows", [None, 7])
def test_encode_sparse_equals_encode(
    arch: str, block_rows: int | None, loaded: dict[str, LoadedSAE]
) -> None:
    sae = loaded[arch]
    acts_ND = torch.randn(50, D_IN, generator=torch.Generator().manual_seed(1))
    rows, feats, vals = encode_sparse(sae, acts_ND, block_rows=block_rows)
    assert (rows.dtype, feats.dtype, vals.dtype) == (np.int64, np.int32, np.float32)
    assert np.all(np.diff(rows) >= 0)
    assert np.all(vals != 0)
    with torch.inference_mode():
        step = block_rows or len(acts_ND)
        blocks = [sae.sae.encode(acts_ND[i : i + step]) for i in range(0, len(acts_ND), step)]
        expected_NF = torch.cat(blocks).numpy()
    got_NF = np.zeros((len(acts_ND), D_SAE), np.float32)
    got_NF[rows, feats] = vals
    np.testing.assert_array_equal(got_NF, expected_NF)
    assert 0 < len(vals) < acts_ND.numel() * D_SAE / D_IN  # sparse, not empty
    if arch == "topk":
        assert np.bincount(rows, minlength=len(acts_ND)).max() <= 5


def test_encode_sparse_accepts_numpy_float16_and_raw_sae(loaded: dict[str, LoadedSAE]) -> None:
    sae = loaded["standard"]
    acts_ND = np.random.default_rng(0).standard_normal((9, D_IN)).astype(np.float16)
    rows, feats, vals = encode_sparse(sae.sae, acts_ND)
    with torch.inference_mode():
        expected_NF = sae.sae.encode(torch.from_numpy(acts_ND).float()).numpy()
    np.testing.assert_array_equal(expected_NF[rows, feats], vals)
    assert np.count_nonzero(expected_NF) == len(vals)


def test_encode_sparse_empty_and_bad_shapes(loaded: dict[str, LoadedSAE]) -> None:
    sae = loaded["standard"]
    rows, feats, vals = encode_sparse(sae, torch.zeros(0, D_IN))
    assert rows.shape == feats.shape == vals.shape == (0,)
    with pytest.raises(InputError, match=r"width 8, the SAE expects d_in=16"):
        encode_sparse(sae, torch.zeros(3, 8))
    with pytest.raises(InputError, match=r"\(N, d_in\)"):
        encode_sparse(sae, torch.zeros(2, 3, D_IN))


def test_check_sae(loaded: dict[str, LoadedSAE]) -> None:
    sae = loaded["standard"]
    check_sae(sae, [HOOK, "blocks.0.hook_resid_post"], {HOOK: D_IN})
    with pytest.raises(
        HookNotFoundError,
        match=r"reads hook 'blocks.2.hook_resid_post'.*captures \['blocks.0.hook_resid_post'\]",
    ):
        check_sae(sae, ["blocks.0.hook_resid_post"], {"blocks.0.hook_resid_post": D_IN})
    with pytest.raises(
        InputError, match=r"d_in=16 but hook 'blocks.2.hook_resid_post' has width 32"
    ):
        check_sae(sae, [HOOK], {HOOK: 32})


def test_hook_override(sae_dirs: dict[str, Path]) -> None:
    sae = load_sae(
        SAESpec(path=str(sae_dirs["standard"]), name="l5", hook="blocks.5.hook_mlp_out"), "cpu"
    )
    assert (sae.name, sae.hook, sae.layer) == ("l5", "blocks.5.hook_mlp_out", 5)


def test_missing_hook_metadata(tmp_path: Path) -> None:
    sae = StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE))
    sae.save_model(tmp_path / "nohook")
    with pytest.raises(InputError, match=r"names no hook.*set `hook = \.\.\.`"):
        load_sae(SAESpec(path=str(tmp_path / "nohook")), "cpu")
    assert load_sae(SAESpec(path=str(tmp_path / "nohook"), hook="module:x"), "cpu").layer is None


def test_not_an_sae_dir(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"not a sae_lens SAE directory \(no cfg.json\)"):
        load_sae(SAESpec(path=str(tmp_path)), "cpu")


def test_training_only_architecture(tmp_path: Path, sae_dirs: dict[str, Path]) -> None:
    d = tmp_path / "batchtopk"
    d.mkdir()
    cfg = json.loads((sae_dirs["topk"] / "cfg.json").read_text())
    (d / "cfg.json").write_text(json.dumps({**cfg, "architecture": "batchtopk"}))
    with pytest.raises(InputError, match=r"architecture 'batchtopk'.*save_inference_model"):
        load_sae(SAESpec(path=str(d)), "cpu")


def test_spec_from_dict_round_trip() -> None:
    spec = SAESpec.from_dict({"release": "gpt2-small-res-jb", "sae_id": "blocks.8.hook_resid_pre"})
    assert spec.name == "gpt2-small-res-jb/blocks.8.hook_resid_pre"
    assert spec.source == spec.name
    assert SAESpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    ("table", "match"),
    [
        ({"path": "a", "layer": 2}, r"unknown key 'layer'; valid keys: path, release, sae_id"),
        ({}, r"either `path`.*not neither"),
        ({"path": "a", "release": "r", "sae_id": "i"}, r"not both"),
        ({"release": "r"}, r"`release` and `sae_id` go together"),
        ({"path": ""}, r"path must be a non-empty string"),
        ({"path": "a", "hook": 3}, r"\[\[saes\]\]\.hook: expected str, got 3"),
    ],
)
def test_spec_errors(table: dict[str, object], match: str) -> None:
    with pytest.raises(SpecError, match=match):
        SAESpec.from_dict(table)


def test_spec_checks_types_when_built_directly() -> None:
    with pytest.raises(SpecError, match=r"hook must be a non-empty string, got 3"):
        SAESpec(path="a", hook=3)  # type: ignore[arg-type]
