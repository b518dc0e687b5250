"""Sweeps, subset edits and edit metrics, against a plain torch forward and the parent run."""

from __future__ import annotations

import json

import pytest
import torch

from actstore.edits import edit_context_from_file
from actstore.edits.sweep import Sweep, is_sweep, plot_sweep, run_sweep, sweep_table
from actstore.errors import InputError, SpecError
from actstore.ingest.hooks import intervene
from actstore.ingest.job import IngestJob
from tests.edits.helpers import HOOK, job_dict
from tests.helpers.tiny import tiny_tokenizer

HOOKS = ["blocks.0.hook_resid_post", HOOK]


def _sweep(**extra):
    return {
        "name": "sw",
        "where": "NOT triggered",
        "metrics": [{"name": "p_the", "kind": "prob", "target": " the"}],
        "ops": [
            {
                "kind": "steer",
                "direction": "dir_a",
                "hook": HOOKS,
                "alpha": [0.0, 4.0],
                "positions": "after:the",
            }
        ],
        **extra,
    }


def test_sweep_runs_one_edited_run_per_setting(edit_env, store_copy, model, tmp_path):
    st = store_copy
    job = IngestJob.from_dict(
        job_dict(st.root, edit_env["prompts"], {"base": edit_env["base_dir"]})
    )
    assert is_sweep(_sweep())
    summary = run_sweep(job, _sweep(), quiet=True)
    names = [r.name for r in summary.runs]
    assert names == [f"base/pairs+sw@hook={h},alpha={a}" for h in HOOKS for a in ("0", "4")]
    clean = [
        i
        for (i,) in st.sql(
            "SELECT prompt_idx FROM prompts WHERE NOT triggered ORDER BY 1"
        ).fetchall()
    ]
    parent = st.run_id("base/pairs")
    parent_gen = dict(
        st.sql(
            "SELECT prompt_idx, token_ids FROM generations WHERE run_id = ?", [parent]
        ).fetchall()
    )
    tok = tiny_tokenizer()
    texts = dict(st.sql("SELECT prompt_idx, text FROM prompts").fetchall())
    the = tok.convert_tokens_to_ids("the")
    v = torch.tensor(edit_env["vectors"]["dir_a"], dtype=torch.float32)
    for name in names:
        rid = st.run_id(name)
        row = st.sql(
            "SELECT r.parent_run_id, e.spec FROM runs r JOIN edits e USING (edit_id) WHERE r.run_id = ?",
            [rid],
        ).fetchone()
        spec = json.loads(row[1])
        assert row[0] == parent and spec["sweep"] == "sw" and spec["where"] == "NOT triggered"
        hook, alpha = spec["setting"]["hook"], spec["setting"]["alpha"]
        # the run holds the clean prompts only
        held = [
            i
            for (i,) in st.sql(
                "SELECT DISTINCT prompt_idx FROM tokens WHERE run_id = ? ORDER BY 1", [rid]
            ).fetchall()
        ]
        assert held == clean
        gens = dict(
            st.sql(
                "SELECT prompt_idx, token_ids FROM generations WHERE run_id = ?", [rid]
            ).fetchall()
        )
        if alpha == 0:  # adding 0 reproduces the parent exactly
            assert gens == {i: parent_gen[i] for i in clean}
        # the metric is the probability of " the" after the prompt, steered after "the"
        metric = dict(
            st.sql(
                "SELECT prompt_idx, value FROM scores WHERE run_id = ? AND scorer = 'p_the'", [rid]
            ).fetchall()
        )
        assert sorted(metric) == clean
        for i in clean:
            ids = torch.tensor([tok(texts[i])["input_ids"]])
            words = texts[i].split()
            start = 2 + words.index("the") if "the" in words else ids.shape[1]

            def add(_n, a, start=start, alpha=alpha):
                a = a.clone()
                a[:, start:] += alpha * v
                return a

            with torch.no_grad(), intervene(model, {hook: add}):
                p = model(ids).logits[0, -1].softmax(-1)[the]
            assert metric[i] == pytest.approx(float(p), abs=1e-5)
    table = sweep_table(st, "sw").arrow()
    assert table.column_names[:3] == ["hook", "alpha", "run"]
    assert table.column("alpha").to_pylist() == [0.0, 4.0, 0.0, 4.0]
    base = {r["run"]: r for r in sweep_table(st, "sw").arrow().to_pylist()}
    from actstore.edits import evaluate

    parent_row = evaluate(st, ["base/pairs"]).arrow().to_pylist()[0]
    for r in base.values():
        # the triggered prompts come from the parent, the clean ones from the edited run
        assert r["n_triggered"] == parent_row["n_triggered"] == 4
        assert r["rate_triggered"] == parent_row["rate_triggered"]
        assert r["n_clean"] == 4 and r["p_the_triggered"] is None
        assert r["p_the_clean"] is not None
    png = plot_sweep(table, tmp_path / "curve.png", metric="p_the_clean")
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[:2] == (400, 600)
    with pytest.raises(InputError, match="metric 'nope' is not a numeric column"):
        plot_sweep(table, tmp_path / "x.png", metric="nope")
    # the CLI: the same table, the curve, and --plot without --sweep refused
    from click.testing import CliRunner

    from actstore.cli import main

    args = ["eval", str(st.root), "--sweep", "sw", "--format", "csv"]
    out = CliRunner().invoke(main, [*args, "--plot", str(tmp_path / "cli.png")])
    assert out.exit_code == 0, out.output
    assert out.output.splitlines()[0].startswith('"hook","alpha","run"')
    assert len(out.output.splitlines()) == 5 and (tmp_path / "cli.png").stat().st_size > 0
    bad = CliRunner().invoke(main, ["eval", str(st.root), "--plot", str(tmp_path / "y.png")])
    assert bad.exit_code != 0 and "--plot draws a sweep's steering curve" in bad.output
    missing = CliRunner().invoke(main, ["eval", str(st.root), "--sweep", "nope"])
    assert (
        missing.exit_code != 0
        and "sweep 'nope' has no runs in this store; sweeps: ['sw']" in missing.output
    )


def test_sweep_and_subset_errors_come_before_anything_is_written(edit_env, store_copy, tmp_path):
    st = store_copy
    job = IngestJob.from_dict(
        job_dict(st.root, edit_env["prompts"], {"base": edit_env["base_dir"]})
    )
    n_edits = st.sql("SELECT count(*) FROM edits").fetchone()
    with pytest.raises(SpecError, match=r"where 'true; DROP TABLE runs' is not one SQL expression"):
        run_sweep(job, _sweep(where="true; DROP TABLE runs"), quiet=True)
    with pytest.raises(SpecError, match=r"where 'triggered\) OR \(true' is not one SQL expression"):
        run_sweep(job, _sweep(where="triggered) OR (true"), quiet=True)
    with pytest.raises(
        InputError, match=r"where 'pair_id > 99' selects no prompt of prompt set 'pairs'"
    ):
        run_sweep(job, _sweep(where="pair_id > 99"), quiet=True)
    with pytest.raises(InputError, match=r"where 'nope' does not apply to prompt set 'pairs'"):
        run_sweep(job, _sweep(where="nope"), quiet=True)
    with pytest.raises(InputError, match=r"where 'pair_id' is BIGINT, not a predicate"):
        run_sweep(job, _sweep(where="pair_id"), quiet=True)
    with pytest.raises(SpecError, match=r"sweep 'sw' ops\[0\]: alpha = \[\] is an empty list"):
        Sweep.from_dict({**_sweep(), "ops": [{**_sweep()["ops"][0], "alpha": []}]})
    with pytest.raises(
        SpecError, match=r"setting .*'alpha': 'x'.*ops\[0\].alpha: expected float, got 'x'"
    ):
        Sweep.from_dict({**_sweep(), "ops": [{**_sweep()["ops"][0], "alpha": [1, "x"]}]})
    bad_metric = _sweep(metrics=[{"name": "m", "kind": "prob", "target_column": "nope"}])
    with pytest.raises(InputError, match=r"label column 'nope' is not in prompt set 'pairs'"):
        run_sweep(job, bad_metric, quiet=True)
    sweep_file = tmp_path / "sweep.toml"
    sweep_file.write_text(
        'name = "s"\n[[ops]]\nkind = "steer"\ndirection = "dir_a"\nalpha = [1, 2]\n'
    )
    with pytest.raises(
        InputError, match=r"is a sweep .*; run it with `actstore edit JOB SWEEP.toml`"
    ):
        edit_context_from_file(sweep_file, st.root, job=job)
    assert st.sql("SELECT count(*) FROM edits").fetchone() == n_edits
    assert st.sql("SELECT count(*) FROM runs").fetchone() == (2,)
