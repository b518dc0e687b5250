"""``bench_peers.py``'s check of every contender's output against a plain torch forward with hooks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from peers_contenders import RUN

# -- reference and comparison ----------------------------------


def reference(spec: dict[str, Any]) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """The first batch's ids and every block's output (float16, rows x d) via forward hooks.

    Key ``-1`` holds the final norm's output (``ln_f`` of the last block's), which is what HF's
    last ``hidden_states`` entry is.
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(spec["threads"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"]).eval()
    ids = np.load(spec["ids"])[: spec["batch"]]
    acts: dict[int, np.ndarray] = {}

    def keep(layer: int) -> Any:
        def hook(_m: Any, _i: Any, out: Any) -> None:
            o = out[0] if isinstance(out, tuple) else out
            acts[layer] = o.to(torch.float16).reshape(-1, o.shape[-1]).numpy().copy()

        return hook

    handles = [b.register_forward_hook(keep(i)) for i, b in enumerate(model.transformer.h)]
    handles.append(model.transformer.ln_f.register_forward_hook(keep(-1)))
    with torch.inference_mode():
        model.transformer(torch.from_numpy(ids))
    for h in handles:
        h.remove()
    return ids, acts


def captured(
    name: str, got: dict[str, Any], work: Path, spec: dict[str, Any]
) -> dict[int, np.ndarray]:
    """The first batch's stored activations of a contender, per layer (rows x d)."""
    rows = spec["batch"] * spec["seq"]
    if name in ("hf_hidden", "nnsight", "tlens"):
        out = Path(got["out_dir"])
        return {layer: np.load(out / f"L{layer}_b0.npy") for layer in range(spec["layers"])}
    if name == "saelens":
        from datasets import load_from_disk

        res = {}
        for layer, d in got["out_dirs"].items():
            ds = load_from_disk(d).with_format("numpy")
            res[int(layer)] = np.asarray(ds[: spec["batch"]][f"transformer.h.{layer}"]).reshape(
                rows, -1
            )
        return res
    if name in ("cli", "run_job", "layers03"):
        import actstore

        st = actstore.open(work / "store")
        layers = range(4) if name == "layers03" else range(spec["layers"])
        return {
            layer: st.acts(RUN, f"blocks.{layer}.hook_resid_post", rows=np.arange(rows)).numpy()
            for layer in layers
        }
    return {}


def stored_ids(
    name: str, got: dict[str, Any], work: Path, spec: dict[str, Any]
) -> np.ndarray | None:
    rows = spec["batch"] * spec["seq"]
    if name == "saelens":
        from datasets import load_from_disk

        d = next(iter(got["out_dirs"].values()))
        return np.asarray(
            load_from_disk(d).with_format("numpy")[: spec["batch"]]["token_ids"]
        ).reshape(-1)
    if name in ("cli", "run_job", "layers03"):
        import actstore

        st = actstore.open(work / "store")
        t = st.sql(
            'SELECT "row", prompt_idx, position, token_id FROM tokens '
            'WHERE run_id = (SELECT run_id FROM runs WHERE name = ?) AND "row" < ? ORDER BY "row"',
            [RUN, rows],
        ).fetchall()
        t_np = np.array(t, dtype=np.int64).reshape(-1, 4)
        if not np.array_equal(t_np[:, 0], t_np[:, 1] * spec["seq"] + t_np[:, 2]):
            raise RuntimeError(f"{name}: stored rows are not prompt-major")
        return t_np[:, 3]
    return None


def _layers(n: int) -> str:
    return f"{n} layer" if n == 1 else f"{n} layers"


def check(
    name: str,
    got: dict[str, Any],
    work: Path,
    spec: dict[str, Any],
    ref: tuple[np.ndarray, dict[int, np.ndarray]],
) -> str:
    """``bit-identical``, ``close (max |diff| ...)`` or ``MISMATCH ...`` against the torch hooks."""
    ref_ids, ref_acts = ref
    ids = stored_ids(name, got, work, spec)
    notes = []
    if ids is not None and not np.array_equal(ids, ref_ids.reshape(-1)):
        notes.append("token ids differ")
    acts = captured(name, got, work, spec)
    if not acts:
        return "n/a (no capture)"
    worst, bad = 0.0, []
    for layer, a in acts.items():
        r = ref_acts[layer]
        if a.shape != r.shape:
            bad.append(f"layer {layer} shape {a.shape}")
            continue
        diff = float(np.max(np.abs(a.astype(np.float32) - r.astype(np.float32))))
        if diff > 1e-2 * float(np.max(np.abs(r.astype(np.float32)))):
            if layer == spec["layers"] - 1 and np.array_equal(a, ref_acts[-1]):
                bad.append(f"layer {layer}, which is ln_f(resid_post) (HF's last hidden state)")
            else:
                bad.append(f"layer {layer} (max |diff| {diff:.3g})")
            continue
        worst = max(worst, diff)
    if bad:
        good = len(acts) - len(bad)
        same = "bit-identical" if worst == 0.0 else f"within max |diff| {worst:.2g}"
        notes.append(f"MISMATCH at {', '.join(bad)}; {_layers(good)} {same}")
    elif worst == 0.0:
        notes.append(f"bit-identical ({_layers(len(acts))})")
    else:
        notes.append(f"close, max |diff| {worst:.2g} ({_layers(len(acts))})")
    return "; ".join(notes)
