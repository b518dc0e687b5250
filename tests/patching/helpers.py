"""The independent reference for the patching tests: plain forward pre-hooks on the decoder layers.

TransformerLens' ``blocks.L.hook_resid_pre`` is the input of decoder layer ``L``;
these helpers read and replace it with ``register_forward_pre_hook`` on
``model.model.layers[L]`` (a Llama), with no actstore code involved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


class Direct:
    """One forward pass per cell, with plain forward pre-hooks on ``model.model.layers[L]``."""

    def __init__(self, model_dir: Path, source_dir: Path | None = None) -> None:
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        src = source_dir or model_dir
        self.source_model = AutoModelForCausalLM.from_pretrained(src).eval()
        self.tok = AutoTokenizer.from_pretrained(model_dir)

    def ids(self, text: str) -> torch.Tensor:
        return torch.tensor([self.tok(text)["input_ids"]])

    @torch.no_grad()
    def resid_pre(self, text: str, layer: int) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        layer_mod = self.source_model.model.layers[layer]
        h = layer_mod.register_forward_pre_hook(
            lambda _m, args, kwargs: seen.append(
                args[0].clone() if args else kwargs["hidden_states"].clone()
            ),
            with_kwargs=True,
        )
        try:
            self.source_model(self.ids(text))
        finally:
            h.remove()
        return seen[0][0]

    @torch.no_grad()
    def metric(
        self,
        text: str,
        good: int,
        bad: int,
        patch: tuple[int, int, torch.Tensor] | None = None,
        model: Any = None,
    ) -> float:
        model = model or self.model
        handles = []
        if patch is not None:
            layer, pos, vec = patch

            def pre(_m: Any, args: tuple, kwargs: dict) -> Any:
                x = (args[0] if args else kwargs["hidden_states"]).clone()
                x[0, pos] = vec
                if args:
                    return (x, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": x}

            handles.append(
                model.model.layers[layer].register_forward_pre_hook(pre, with_kwargs=True)
            )
        try:
            logits = model(self.ids(text)).logits[0, -1]
        finally:
            for h in handles:
                h.remove()
        return float(logits[good] - logits[bad])

    def token(self, text: str) -> int:
        return int(self.tok.convert_tokens_to_ids(text))

    def resid_post(self, text: str, layer: int) -> torch.Tensor:
        """Layer ``L``'s output (the next layer's input), of the target model."""
        seen: list[torch.Tensor] = []
        h = self.model.model.layers[layer].register_forward_hook(
            lambda _m, _a, out: seen.append(
                (out[0] if isinstance(out, tuple) else out).detach().clone()
            )
        )
        try:
            with torch.no_grad():
                self.model(self.ids(text))
        finally:
            h.remove()
        return seen[0][0]

    def directional_derivative(
        self, text: str, good: int, bad: int, layer: int, pos: int, delta: torch.Tensor
    ) -> float:
        """d metric / d eps of the target with resid_pre[layer][pos] += eps * delta, at eps = 0."""
        eps = torch.zeros((), requires_grad=True)

        def pre(_m: Any, args: tuple, kwargs: dict) -> Any:
            x = args[0] if args else kwargs["hidden_states"]
            bump = torch.zeros_like(x)
            bump[0, pos] = delta
            x = x + eps * bump
            if args:
                return (x, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": x}

        h = self.model.model.layers[layer].register_forward_pre_hook(pre, with_kwargs=True)
        try:
            logits = self.model(self.ids(text)).logits[0, -1]
            (g,) = torch.autograd.grad(logits[good] - logits[bad], [eps])
        finally:
            h.remove()
        return float(g)
