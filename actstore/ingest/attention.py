"""Attention patterns and scores: recorded from HF's attention function, stored sparse.

``blocks.{L}.attn.hook_attn_scores`` and ``blocks.{L}.attn.hook_pattern`` are
TransformerLens' ``(B, H, S_query, S_key)`` pre-softmax scores (scaled, soft-capped
for Gemma 2, ``-inf`` where a query may not attend) and their softmax. HF does not
expose them (its ``sdpa`` attention never forms them), so they are recomputed from
the query and key states HF hands its attention function (after rotary
embeddings), with HF's own scaling, soft-cap and mask: while such a hook is
registered, the name of the model's attention implementation (``eager``,
``sdpa``...) maps, in transformers' ``AttentionInterface``, to a wrapper that
records for the hooked attention modules and then calls the function the name
mapped to before (for ``eager``, the modeling file's own ``eager_attention_forward``).
Other models and unhooked layers pass straight through.

They are not vectors per token, so an ingest stores a sparse subset of them
(:class:`AttentionKeep`, the job's ``capture.attention_keep``) as rows of the
catalog table ``attention`` (:func:`attention_rows`; columns in ``docs/FORMAT.md``).

Example
-------
>>> s = attention_scores(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), None)
>>> pattern_of(s)[0, 0].tolist()
[[1.0, 0.0], [0.5, 0.5]]
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from actstore.errors import InputError, SpecError

__all__ = [
    "ATTENTION_KINDS",
    "ATTENTION_SCHEMA",
    "AttentionKeep",
    "attention_rows",
    "attention_scores",
    "is_attention_hook",
    "pattern_of",
    "register_attention",
]

ATTENTION_KINDS: tuple[str, ...] = ("attn.hook_attn_scores", "attn.hook_pattern")
"""Per-head kinds over (query, key) pairs, stored sparse in the ``attention`` table."""

Fn = Callable[[torch.Tensor], "torch.Tensor | None"]

ATTENTION_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("layer", pa.int32()),
        ("head", pa.int32()),
        ("key_position", pa.int32()),
        ("weight", pa.float32()),
        ("score", pa.float32()),
    ]
)
"""Columns of the rows :func:`attention_rows` returns (``run_id`` is added on commit)."""


def is_attention_hook(hook: str) -> bool:
    """Whether ``hook`` is ``hook_pattern`` or ``hook_attn_scores`` (stored sparse).

    Example
    -------
    >>> is_attention_hook("blocks.0.attn.hook_attn_scores"), is_attention_hook("blocks.0.attn.hook_q")
    (True, False)
    """
    parts = hook.split(".", 2)
    return len(parts) == 3 and parts[0] == "blocks" and parts[2] in ATTENTION_KINDS


def _layer(hook: str) -> int:
    return int(hook.split(".")[1])


def _kind(hook: str) -> str:
    return hook.split(".", 2)[2]


class _Handle:
    """A removable registration, like torch's ``RemovableHandle``."""

    def __init__(self, remove: Callable[[], None]) -> None:
        self._remove: Callable[[], None] | None = remove

    def remove(self) -> None:
        if self._remove is not None:
            self._remove()
            self._remove = None


# Attention functions are looked up by name in transformers' AttentionInterface on
# every call; while any pattern hook is registered, the model's implementation name
# maps to a wrapper that records for the modules in _RECORDERS and then calls the
# function that name mapped to before (or the modeling file's eager function).
_RECORDERS: dict[int, list[tuple[str, str, Fn]]] = {}
_INSTALLED: dict[str, tuple[int, Any]] = {}  # implementation -> (users, previous local entry)
_LOCK = threading.Lock()
_MISSING = object()


def _interface() -> Any:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS


def _original(impl: str, previous: Any, module: nn.Module) -> Callable[..., Any]:
    if previous is not _MISSING:
        return previous
    glob = type(_interface())._global_mapping
    if impl in glob:
        return glob[impl]
    return sys.modules[type(module).__module__].eager_attention_forward


def _make_wrapper(impl: str) -> Callable[..., Any]:
    def wrapper(
        module: nn.Module, query: torch.Tensor, key: torch.Tensor, *args: Any, **kw: Any
    ) -> Any:
        recorders = _RECORDERS.get(id(module))
        if recorders:
            mask = args[1] if len(args) > 1 else kw.get("attention_mask")
            scores = attention_scores(query, key, mask, kw.get("scaling"), kw.get("softcap"))
            pattern = pattern_of(scores)
            for hook, kind, fn in list(recorders):
                if fn(scores if kind == "attn.hook_attn_scores" else pattern) is not None:
                    raise InputError(
                        f"hook {hook!r}: attention patterns cannot be edited; edit "
                        "blocks.L.attn.hook_q, hook_k, hook_v or hook_z instead"
                    )
        previous = _INSTALLED[impl][1] if impl in _INSTALLED else _MISSING
        return _original(impl, previous, module)(module, query, key, *args, **kw)

    return wrapper


def register_attention(hook: str, module: nn.Module, fn: Fn) -> _Handle:
    """Call ``fn(scores_or_pattern_BHQS)`` whenever ``module`` (an attention module) runs.

    Returns
    -------
    object
        A handle whose ``.remove()`` unregisters ``fn`` and, with the last one,
        restores the attention function.

    Example
    -------
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10))
    >>> seen = []
    >>> h = register_attention("blocks.0.attn.hook_pattern", m.transformer.h[0].attn,
    ...                        lambda p: seen.append(p.shape))
    >>> _ = m(torch.tensor([[1, 2, 3]])); h.remove(); seen
    [torch.Size([1, 2, 3, 3])]
    """
    kind = _kind(hook)
    impl = getattr(getattr(module, "config", None), "_attn_implementation", None) or "eager"
    entry = (hook, kind, fn)
    with _LOCK:
        interface = _interface()
        if impl in _INSTALLED:
            users, previous = _INSTALLED[impl]
            _INSTALLED[impl] = (users + 1, previous)
        else:
            _INSTALLED[impl] = (1, interface._local_mapping.get(impl, _MISSING))
            interface[impl] = _make_wrapper(impl)
        _RECORDERS.setdefault(id(module), []).append(entry)

    def remove() -> None:
        with _LOCK:
            recs = _RECORDERS[id(module)]
            recs.remove(entry)
            if not recs:
                del _RECORDERS[id(module)]
            users, previous = _INSTALLED[impl]
            if users > 1:
                _INSTALLED[impl] = (users - 1, previous)
                return
            del _INSTALLED[impl]
            interface = _interface()
            if previous is _MISSING:
                interface._local_mapping.pop(impl, None)
            else:
                interface[impl] = previous

    return _Handle(remove)


def attention_scores(
    query_BHQd: torch.Tensor,
    key_BKSd: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """TL's ``hook_attn_scores`` from the states HF's attention function receives.

    Parameters
    ----------
    query_BHQd, key_BKSd
        After rotary embeddings; ``K`` key-value heads (repeated to ``H`` as HF's
        ``repeat_kv`` does).
    mask
        HF's mask as passed: ``None`` (causal), a 4-D boolean (True = attend) or
        additive mask, or a 2-D ``(B, S)`` padding mask (flash attention; causal added).
    scaling, softcap
        As HF passes them (``None``: ``d_head ** -0.5``, no soft-cap).

    Returns
    -------
    torch.Tensor
        ``(B, H, Q, S)`` float32, ``-inf`` where a query may not attend.

    Example
    -------
    >>> s = attention_scores(torch.ones(1, 2, 3, 4), torch.ones(1, 1, 3, 4), None)
    >>> s.shape, s[0, 0, 0].tolist()
    (torch.Size([1, 2, 3, 3]), [2.0, -inf, -inf])
    """
    n_rep = query_BHQd.shape[1] // key_BKSd.shape[1]
    k = key_BKSd.float().repeat_interleave(n_rep, dim=1)
    scale = scaling if scaling is not None else query_BHQd.shape[-1] ** -0.5
    scores = torch.matmul(query_BHQd.float(), k.transpose(-1, -2)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    n_q, n_k = scores.shape[-2:]
    causal = torch.ones(n_q, n_k, dtype=torch.bool, device=scores.device).tril(n_k - n_q)
    if mask is None:
        allowed = causal
    elif mask.dim() == 2:  # flash attention's (B, S) padding mask: 1 = a real token
        allowed = causal & mask[:, None, None, :n_k].bool()
    else:
        m = mask[..., :n_k]
        allowed = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
    return scores.masked_fill(~allowed, -math.inf)


def pattern_of(scores_BHQS: torch.Tensor) -> torch.Tensor:
    """TL's ``hook_pattern``: the softmax of the scores, 0 for rows with no allowed key.

    Example
    -------
    >>> pattern_of(torch.tensor([[0.0, 0.0, -math.inf]])).tolist()
    [[0.5, 0.5, 0.0]]
    """
    return torch.softmax(scores_BHQS, dim=-1).nan_to_num(0.0)


# --- sparse storage ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AttentionKeep:
    """Which keys of each (query, head) the ingest keeps, from the job's ``capture.attention_keep``.

    ``mass:P`` (default ``mass:0.99``): the smallest set of keys, by weight, whose
    weights sum to at least ``P``; ``top:K``: the ``K`` heaviest keys; ``above:T``:
    every key of weight ``>= T``. Keys with weight 0 (masked) are never kept. The
    rule is applied to the pattern; ``hook_attn_scores`` keeps the scores of the same
    keys (the softmax is monotonic, so ``top:K`` is also the top ``K`` by score).

    Example
    -------
    >>> AttentionKeep.parse("mass:0.9").value
    0.9
    >>> AttentionKeep.parse("mass:2")
    Traceback (most recent call last):
    ...
    actstore.errors.SpecError: capture.attention_keep 'mass:2': P must be in (0, 1]; e.g. 'mass:0.99', 'top:8' or 'above:0.05'
    """

    rule: Literal["mass", "top", "above"]
    """The rule."""
    value: float
    """``P``, ``K`` or ``T``."""

    @classmethod
    def parse(cls, text: str) -> AttentionKeep:
        """Parse ``mass:P``, ``top:K`` or ``above:T``; :class:`SpecError` otherwise.

        Example
        -------
        >>> AttentionKeep.parse("above:0.05")
        AttentionKeep(rule='above', value=0.05)
        """
        hint = "e.g. 'mass:0.99', 'top:8' or 'above:0.05'"
        rule, _, raw = str(text).partition(":")
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        where = f"capture.attention_keep {text!r}"
        if rule not in ("mass", "top", "above") or math.isnan(value):
            raise SpecError(f"{where} is not RULE:NUMBER with RULE mass, top or above; {hint}")
        if rule == "mass" and not 0 < value <= 1:
            raise SpecError(f"{where}: P must be in (0, 1]; {hint}")
        if rule == "top" and (value < 1 or value != int(value)):
            raise SpecError(f"{where}: K must be a whole number >= 1; {hint}")
        if rule == "above" and not 0 < value <= 1:
            raise SpecError(f"{where}: T must be in (0, 1]; {hint}")
        return cls(rule, value)  # type: ignore[arg-type]

    def keep(self, w_RS: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the kept keys of each row of weights ``w_RS``.

        Example
        -------
        >>> w = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
        >>> AttentionKeep.parse("mass:0.9").keep(w).tolist()
        [[True, True, True, False]]
        """
        if self.rule == "above":
            return w_RS >= self.value
        sw, idx = w_RS.sort(dim=-1, descending=True, stable=True)
        if self.rule == "mass":
            kept = ((sw.cumsum(-1) - sw) < self.value) & (sw > 0)
        else:
            kept = (torch.arange(sw.shape[-1], device=sw.device) < int(self.value)) & (sw > 0)
        return torch.zeros_like(kept).scatter(-1, idx, kept)


def attention_rows(
    acts: dict[str, torch.Tensor],
    stored_BS: torch.Tensor,
    offsets: list[int],
    keep: AttentionKeep,
) -> pa.Table:
    """The kept entries of a batch's captured patterns / scores, as ``attention`` rows.

    Parameters
    ----------
    acts
        Hook name -> ``(B, H, S, S)`` for the batch's ``hook_pattern`` and
        ``hook_attn_scores`` hooks (others are ignored).
    stored_BS
        Which (prompt, padded position) are stored rows; their batch-local row is
        their rank in row-major order, as for the arrays.
    offsets
        Per prompt, the padded index of its position 0.
    keep
        The selection rule.

    Returns
    -------
    pyarrow.Table
        :data:`ATTENTION_SCHEMA`, sorted by (row, layer, head, key_position);
        ``weight`` NULL unless ``hook_pattern`` was captured at that layer,
        ``score`` NULL unless ``hook_attn_scores`` was.

    Example
    -------
    >>> s = attention_scores(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), None)
    >>> t = attention_rows({"blocks.0.attn.hook_pattern": pattern_of(s)},
    ...                    torch.ones(1, 3, dtype=torch.bool), [0], AttentionKeep("top", 1))
    >>> t.num_rows, t.column_names[:3]
    (6, ['row', 'layer', 'head'])
    """
    by_layer: dict[int, dict[str, torch.Tensor]] = {}
    for hook, value in acts.items():
        if is_attention_hook(hook):
            by_layer.setdefault(_layer(hook), {})[_kind(hook)] = value
    if not by_layer:
        return ATTENTION_SCHEMA.empty_table()
    b_N, q_N = stored_BS.nonzero(as_tuple=True)
    off_N = torch.as_tensor(offsets, device=stored_BS.device)[b_N]
    parts = []
    for layer in sorted(by_layer):
        got = by_layer[layer]
        scores = got.get("attn.hook_attn_scores")
        pattern = got.get("attn.hook_pattern")
        w = pattern if pattern is not None else pattern_of(scores)  # type: ignore[arg-type]
        w_NHS = w[b_N, :, q_N].float()
        n, h, k = keep.keep(w_NHS).nonzero(as_tuple=True)
        cols: dict[str, Any] = {
            "row": n.cpu().numpy().astype(np.int64),
            "layer": np.full(n.numel(), layer, np.int32),
            "head": h.cpu().numpy().astype(np.int32),
            "key_position": (k - off_N[n]).cpu().numpy().astype(np.int32),
        }
        for name, src in (("weight", pattern), ("score", scores)):
            vals = None if src is None else src[b_N, :, q_N].float()[n, h, k].cpu().numpy()
            cols[name] = pa.nulls(n.numel(), pa.float32()) if vals is None else pa.array(vals)
        parts.append(pa.table(cols, schema=ATTENTION_SCHEMA))
    if not parts:
        return ATTENTION_SCHEMA.empty_table()
    return pa.concat_tables(parts).sort_by(
        [
            ("row", "ascending"),
            ("layer", "ascending"),
            ("head", "ascending"),
            ("key_position", "ascending"),
        ]
    )
