"""Edited ingests: runs linked to parent and edit, patching across checkpoints, steered generation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from actstore.edits import EditOp, EditSpec, edit_context_from_file, run_edited
from actstore.errors import InputError
from actstore.ingest.hooks import intervene, run_capture
from actstore.ingest.job import IngestJob
from actstore.ingest.runner import run_job
from tests.edits.helpers import HOOK, job_dict


def _job(env, store, checkpoints=("base",), **kw) -> IngestJob:
    dirs = {"base": env["base_dir"], "ft": env["ft_dir"]}
    return IngestJob.from_dict(
        job_dict(store.root, env["prompts"], {c: dirs[c] for c in checkpoints}, **kw)
    )


def test_edited_run_is_linked_to_parent_and_edit(edit_env, store_copy, tmp_path):
    st = store_copy
    np.save(tmp_path / "u.npy", edit_env["vectors"]["dir_a"])
    (tmp_path / "abl.toml").write_text(
        f'name = "abl"\n\n[[ops]]\nkind = "ablate_direction"\nhook = "{HOOK}"\nfile = "u.npy"\n'
    )
    job = _job(edit_env, st)
    ctx = edit_context_from_file(tmp_path / "abl.toml", st.root, job=job)
    summary = run_job(job, quiet=True, edit=ctx)
    assert [(r.name, r.status) for r in summary.runs] == [("base/pairs+abl", "ingested")]
    row = st.sql(
        """SELECT r.parent_run_id, p.name, e.name, e.spec FROM runs r
           JOIN runs p ON p.run_id = r.parent_run_id JOIN edits e ON e.edit_id = r.edit_id
           WHERE r.name = 'base/pairs+abl'"""
    ).fetchone()
    assert row[:3] == (st.run_id("base/pairs"), "base/pairs", "abl")
    assert json.loads(row[3])["ops"][0]["file"] == str(tmp_path / "u.npy")
    # the stored activations at the hook have no component along u
    u = edit_env["vectors"]["dir_a"] / np.linalg.norm(edit_env["vectors"]["dir_a"])
    assert np.abs(st.acts("base/pairs+abl", HOOK).numpy() @ u).max() < 1e-5
    # running it again adds nothing; run_edited with the same spec finds it complete
    again = run_edited(job, tmp_path / "abl.toml", quiet=True)
    assert [r.status for r in again.runs] == ["already complete"]


def test_patching_from_another_checkpoint_gives_its_stored_values(edit_env, store_copy):
    st = store_copy
    spec = EditSpec(
        name="patch_ft",
        ops=[EditOp(kind="patch", hook=HOOK, source_run="ft/pairs", positions="prompt")],
    )
    run_edited(_job(edit_env, st), spec, quiet=True)
    got = st.acts("base/pairs+patch_ft", HOOK, where="NOT is_completion")
    want = st.acts("ft/pairs", HOOK, where="NOT is_completion")
    assert got.meta.column("position").to_pylist() == want.meta.column("position").to_pylist()
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    base = st.acts("base/pairs", HOOK, where="NOT is_completion").numpy()
    assert not np.allclose(base, want.numpy(), atol=1e-3)  # the checkpoints differ
    # downstream of the patch the base model continues from ft's layer-1 state
    down = st.acts("base/pairs+patch_ft", "blocks.2.hook_resid_post", where="NOT is_completion")
    assert not np.allclose(
        down.numpy(),
        st.acts("ft/pairs", "blocks.2.hook_resid_post", where="NOT is_completion").numpy(),
    )


def test_patch_job_over_other_prompt_sets_is_refused(edit_env, store_copy, tmp_path):
    d = job_dict(store_copy.root, edit_env["prompts"], {"base": edit_env["base_dir"]})
    d["prompts"].append({"name": "other", "path": str(edit_env["prompts"])})
    spec = EditSpec(name="p", ops=[EditOp(kind="patch", hook=HOOK, source_run="ft/pairs")])
    with pytest.raises(
        InputError, match=r"covers prompt set 'pairs', but the job also runs \['other'\]"
    ):
        run_edited(IngestJob.from_dict(d), spec, quiet=True)
    assert store_copy.sql("SELECT count(*) FROM edits").fetchone() == (0,)  # nothing recorded


def test_width_mismatch_is_refused_before_any_run(edit_env, store_copy, tmp_path):
    np.save(tmp_path / "v.npy", np.ones(8))
    spec = EditSpec(name="w", ops=[EditOp(kind="steer", hook=HOOK, file=str(tmp_path / "v.npy"))])
    with pytest.raises(
        InputError, match="it has width 8 but the model's activations there have width 32"
    ):
        run_edited(_job(edit_env, store_copy), spec, quiet=True)
    assert store_copy.sql("SELECT count(*) FROM runs WHERE name LIKE '%+w'").fetchone() == (0,)


def test_steering_completions_matches_a_hand_written_greedy_loop(edit_env, store_copy, model):
    """Steer only generated tokens: prompt activations stay, completions follow the steered model."""
    st = store_copy
    alpha, v = 6.0, edit_env["vectors"]["dir_b"]
    spec = EditSpec(
        name="steer_c",
        ops=[EditOp(kind="steer", direction="dir_b", alpha=alpha, positions="completion")],
    )
    run_edited(_job(edit_env, st), spec, quiet=True)
    run = "base/pairs+steer_c"
    # prompt tokens: identical to the unedited run (causal: completions come later)
    np.testing.assert_array_equal(
        st.acts(run, HOOK, where="NOT is_completion").numpy(),
        st.acts("base/pairs", HOOK, where="NOT is_completion").numpy(),
    )
    v_t = torch.tensor(v, dtype=torch.float32)
    prompts = st.sql(
        """SELECT prompt_idx, list(token_id ORDER BY position) FROM tokens
           WHERE run_id = ? AND NOT is_completion GROUP BY prompt_idx ORDER BY prompt_idx""",
        [st.run_id(run)],
    ).fetchall()
    changed = 0
    for pidx, ids in prompts:
        n = len(ids)

        def add(_name, acts, n=n):
            out = acts.clone()
            out[:, n:] += alpha * v_t
            return out

        seq = list(ids)
        with torch.no_grad(), intervene(model, {HOOK: add}):
            for _ in range(3):  # greedy, no KV cache: the whole sequence each step
                nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
                if nxt == 3:  # eos
                    break
                seq.append(nxt)
            want_acts = run_capture(model, [HOOK], input_ids=torch.tensor([seq]))[HOOK][0]
        got = st.sql(
            "SELECT token_ids FROM generations WHERE run_id = ? AND prompt_idx = ?",
            [st.run_id(run), pidx],
        ).fetchone()[0]
        assert list(got) == seq[n:]
        parent = st.sql(
            "SELECT token_ids FROM generations WHERE run_id = ? AND prompt_idx = ?",
            [st.run_id("base/pairs"), pidx],
        ).fetchone()[0]
        changed += list(parent) != list(got)
        # the stored completion rows are the steered activations of the steered tokens
        stored = st.acts(run, HOOK, where=f"prompt_idx = {pidx} AND is_completion").numpy()
        np.testing.assert_allclose(stored, want_acts[n : len(seq)].numpy(), atol=2e-5)
    assert changed > 0  # steering changed some completions
