"""``actstore demo`` leaves the job and edit files it ran, and they re-run as they are."""

from __future__ import annotations

import json

from click.testing import CliRunner

from actstore.cli import main
from actstore.edits.spec import EditSpec
from actstore.ingest.job import IngestJob


def test_the_demo_writes_its_job_and_edit_files(demo):
    report, st = demo
    out = report.out_dir
    assert sorted(report.facts["files"]) == sorted(
        ["jobs/train.toml", "jobs/pairs.toml", "jobs/edit_base.toml"]
        + [f"edits/{n}.toml" for n in ("ablate_trigger_dir", "steer_trigger_dir",
                                       "ablate_top_features", "sae_identity")]
    )  # fmt: skip
    # the files are the jobs the store recorded
    pairs = IngestJob.from_toml(out / "jobs" / "pairs.toml")
    (prov,) = st.sql("SELECT provenance FROM runs WHERE name = 'backdoored/pairs'").fetchall()[0]
    recorded = json.loads(prov)["job"]
    assert [s["regex"] for s in recorded["scorers"]] == [s.regex for s in pairs.scorers]
    assert [c["label"] for c in recorded["checkpoints"]] == [c.label for c in pairs.checkpoints]
    assert (out / "jobs" / pairs.store).resolve() == st.root.resolve()
    for name in ("ablate_trigger_dir", "steer_trigger_dir", "ablate_top_features", "sae_identity"):
        from_file = EditSpec.from_toml(out / "edits" / f"{name}.toml")
        (spec,) = st.sql("SELECT spec FROM edits WHERE name = ?", [name]).fetchall()[0]
        assert from_file.hash() == EditSpec.from_dict(json.loads(spec)).hash()


def test_the_edit_files_rerun_with_the_cli_without_duplicating(demo):
    report, st = demo
    out = report.out_dir
    before = st.sql("SELECT run_id, name, job_hash FROM runs ORDER BY run_id").fetchall()
    res = CliRunner().invoke(
        main,
        ["edit", str(out / "jobs" / "edit_base.toml"), str(out / "edits" / "ablate_trigger_dir.toml"), "-q"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert st.sql("SELECT run_id, name, job_hash FROM runs ORDER BY run_id").fetchall() == before
