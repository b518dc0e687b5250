"""Per-head hook points: queries, keys, values, head outputs and attention patterns.

TransformerLens (TL) names and values, for every family of
:mod:`actstore.ingest.families`:

- ``blocks.{L}.attn.hook_q`` / ``hook_k`` / ``hook_v`` - the query, key and value
  projections of each head, *before* rotary embeddings (TL's ``hook_rot_q`` /
  ``hook_rot_k`` are after them). TL's shape ``(B, S, H, d_head)`` is stored
  flattened head-major, ``(B, S, H * d_head)``, so they are row-aligned vectors
  like any other hook. For grouped-query attention (Llama, Mistral, Qwen2, Gemma
  with ``num_key_value_heads < num_attention_heads``) ``hook_k`` and ``hook_v``
  have one head per *key-value* head, as TL 3's ``GroupedQueryAttention`` with
  its default ``ungroup_grouped_query_attention=False``.
- ``blocks.{L}.attn.hook_z`` - each head's output, the pattern-weighted sum of
  values, before the output projection (its input): ``H * d_head``.
- ``blocks.{L}.attn.hook_attn_scores`` and ``blocks.{L}.attn.hook_pattern`` -
  ``(B, H, S_query, S_key)``: the pre-softmax scores (scaled, soft-capped for
  Gemma 2, ``-inf`` where masked) and the softmax. These are not row-aligned;
  the ingest keeps a sparse subset of them (:class:`AttentionKeep`) in the
  catalog table ``attention`` (:func:`attention_rows`).

Where HF computes them (:data:`HEAD_SITES`): q, k, v are the outputs of the
separate projections (Llama-like), or slices of GPT-2's fused ``c_attn`` output
(``[q | k | v]``) or of GPT-NeoX's ``query_key_value`` output (per head
``[q_h | k_h | v_h]``); ``hook_z`` is the input of the output projection. Scores
and patterns are recomputed inside HF's attention function:
:mod:`actstore.ingest.attention`, which also holds their sparse storage.

Example
-------
>>> is_head_hook("blocks.0.attn.hook_z"), is_attention_hook("blocks.0.attn.hook_pattern")
(True, True)
>>> AttentionKeep.parse("top:5")
AttentionKeep(rule='top', value=5.0)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from actstore.errors import InputError
from actstore.ingest.attention import (
    ATTENTION_KINDS,
    AttentionKeep,
    Fn,
    attention_rows,
    is_attention_hook,
    register_attention,
)

if TYPE_CHECKING:
    from actstore.ingest.families import ModelAdapter

__all__ = [
    "ATTENTION_KINDS",
    "DENSE_HEAD_KINDS",
    "HEAD_KINDS",
    "HEAD_SITES",
    "AttentionKeep",
    "HeadSites",
    "attention_rows",
    "head_geometry",
    "head_layout",
    "is_attention_hook",
    "is_head_hook",
    "register",
]

DENSE_HEAD_KINDS: tuple[str, ...] = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z")
"""Per-head kinds stored as row-aligned arrays, ``H * d_head`` wide."""
HEAD_KINDS: tuple[str, ...] = (*DENSE_HEAD_KINDS, *ATTENTION_KINDS)
"""Every per-head kind, in forward order."""


def _kind(hook: str) -> str:
    parts = hook.split(".", 2)
    return parts[2] if len(parts) == 3 and parts[0] == "blocks" else ""


def is_head_hook(hook: str) -> bool:
    """Whether ``hook`` names a per-head kind (dense or attention).

    Example
    -------
    >>> is_head_hook("blocks.3.attn.hook_k"), is_head_hook("blocks.3.hook_resid_post")
    (True, False)
    """
    return _kind(hook) in HEAD_KINDS


@dataclass(frozen=True, slots=True)
class HeadSites:
    """Where one family's attention computes the per-head hooks (paths from a decoder layer).

    Example
    -------
    >>> HEAD_SITES["gpt2"].qkv
    'fused'
    """

    attn: str
    """The attention module (the one that calls HF's attention function)."""
    qkv: Literal["separate", "fused", "interleaved"]
    """``separate`` q/k/v projections; GPT-2's ``fused`` ``[q | k | v]``; NeoX's per-head
    ``interleaved`` ``[q_h | k_h | v_h]``."""
    q: str
    """The query projection (for fused layouts, the one qkv projection)."""
    k: str
    """The key projection."""
    v: str
    """The value projection."""
    o: str
    """The output projection; its input is ``hook_z``."""


_LLAMA_LIKE = HeadSites(
    "self_attn",
    "separate",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
)

HEAD_SITES: dict[str, HeadSites] = {
    "gpt2": HeadSites("attn", "fused", "attn.c_attn", "attn.c_attn", "attn.c_attn", "attn.c_proj"),
    "gpt_neox": HeadSites(
        "attention",
        "interleaved",
        "attention.query_key_value",
        "attention.query_key_value",
        "attention.query_key_value",
        "attention.dense",
    ),
    "llama": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
}
"""Family name (:attr:`ModelAdapter.family`) -> its :class:`HeadSites`."""


def head_geometry(config: Any) -> tuple[int, int, int]:
    """``(n_heads, n_kv_heads, d_head)`` of a HF config.

    Example
    -------
    >>> from transformers import LlamaConfig
    >>> head_geometry(LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2))
    (4, 2, 8)
    """
    n_heads = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
    d_head = int(getattr(config, "head_dim", None) or config.hidden_size // n_heads)
    return n_heads, n_kv, d_head


def head_layout(adapter: ModelAdapter, hook: str) -> tuple[int, int]:
    """``(heads, d_head)`` of a dense per-head hook: its columns are ``heads * d_head``.

    ``hook_k`` and ``hook_v`` have ``n_kv_heads`` heads (fewer under grouped-query
    attention); ``hook_q`` and ``hook_z`` have ``n_heads``.

    Raises
    ------
    InputError
        For ``hook_pattern`` / ``hook_attn_scores``, which are not row-aligned.

    Example
    -------
    >>> from transformers import LlamaConfig
    >>> from actstore.ingest.families import adapter_for
    >>> a = adapter_for(LlamaConfig(num_hidden_layers=1, hidden_size=32,
    ...                              num_attention_heads=4, num_key_value_heads=2))
    >>> head_layout(a, "blocks.0.attn.hook_q"), head_layout(a, "blocks.0.attn.hook_v")
    ((4, 8), (2, 8))
    """
    kind = _kind(hook)
    if kind in ATTENTION_KINDS:
        raise InputError(
            f"hook {hook!r} is an attention pattern over (query, key) pairs, not a vector per "
            "token: it is stored in the catalog table 'attention' (see docs/FORMAT.md), not as an "
            "array; capture it for that, or use blocks.L.attn.hook_z for a per-token per-head value"
        )
    heads = adapter.n_kv_heads if kind in ("attn.hook_k", "attn.hook_v") else adapter.n_heads
    return heads, adapter.d_head


def head_layouts(adapter: ModelAdapter, hooks: list[str]) -> dict[str, list[int]]:
    """``{hook: [heads, d_head]}`` for the dense per-head hooks among ``hooks``.

    The run records it (array attribute ``heads``, provenance ``heads``) so that
    :meth:`actstore.store.result.Acts.heads` can return ``(N, H, d_head)``.

    Example
    -------
    >>> from transformers import GPT2Config
    >>> from actstore.ingest.families import adapter_for
    >>> a = adapter_for(GPT2Config(n_layer=1, n_embd=16, n_head=2))
    >>> head_layouts(a, ["blocks.0.attn.hook_z", "blocks.0.hook_resid_post"])
    {'blocks.0.attn.hook_z': [2, 8]}
    """
    return {
        h: list(head_layout(adapter, h))
        for h in hooks
        if is_head_hook(h) and not is_attention_hook(h)
    }


def provenance(adapter: ModelAdapter, hooks: list[str], keep: str) -> dict[str, Any]:
    """The run provenance entries of per-head capture: ``heads`` and ``attention_keep``.

    Empty for runs without per-head hooks, so their provenance is unchanged;
    ``attention_keep`` only where a pattern or score hook is captured.

    Example
    -------
    >>> from transformers import GPT2Config
    >>> from actstore.ingest.families import adapter_for
    >>> provenance(adapter_for(GPT2Config(n_layer=1)), ["blocks.0.hook_resid_pre"], "mass:0.99")
    {}
    """
    out: dict[str, Any] = {}
    layouts = head_layouts(adapter, hooks)
    if layouts:
        out["heads"] = layouts
    if any(is_attention_hook(h) for h in hooks):
        out["attention_keep"] = keep
    return out


# --- capture ----------------------------------------------------------------------------


def _slice(sites: HeadSites, kind: str, n_heads: int, d_head: int) -> Callable[..., Any] | None:
    """For fused layouts: (get, put) of a kind's part of the projection output."""
    if sites.qkv == "separate" or kind == "attn.hook_z":
        return None
    which = "qkv".index(kind[-1])
    if sites.qkv == "fused":
        width = n_heads * d_head

        def get(out: torch.Tensor) -> torch.Tensor:
            return out[..., which * width : (which + 1) * width]

    else:  # interleaved: (..., H, 3 * d_head)

        def get(out: torch.Tensor) -> torch.Tensor:
            per_head = out.unflatten(-1, (n_heads, 3 * d_head))
            return per_head[..., which * d_head : (which + 1) * d_head].flatten(-2)

    return get


def register(model: nn.Module, adapter: ModelAdapter, hook: str, fn: Fn) -> Any:
    """Call ``fn(acts)`` at a per-head hook; a returned tensor replaces a dense hook's value.

    ``acts`` is ``(B, S, H * d_head)`` for the dense kinds and ``(B, H, S, S)`` (float32)
    for ``hook_attn_scores`` / ``hook_pattern``, which cannot be replaced.

    Returns
    -------
    object
        A handle with ``.remove()``.

    Raises
    ------
    InputError
        If the family has no per-head sites, or, during the forward pass, if ``fn``
        returns a replacement for an attention pattern.

    Example
    -------
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> from actstore.ingest.families import adapter_for
    >>> m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10))
    >>> seen = []
    >>> h = register(m, adapter_for(m), "blocks.0.attn.hook_q", lambda a: seen.append(a.shape))
    >>> _ = m(torch.tensor([[1, 2, 3]])); h.remove(); seen
    [torch.Size([1, 3, 8])]
    """
    layer, kind = adapter.check(hook)
    assert layer is not None
    sites = sites_for(adapter)
    block = adapter.layer(model, layer)
    if kind in ATTENTION_KINDS:
        return register_attention(hook, block.get_submodule(sites.attn), fn)
    if kind == "attn.hook_z":

        def on_input(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            new = fn(args[0] if args else kwargs["hidden_states"])  # the o-projection's input
            if new is None:
                return None
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

        return block.get_submodule(sites.o).register_forward_pre_hook(on_input, with_kwargs=True)
    # fused layouts (GPT-2, NeoX) have no grouped-query attention: n_heads of each
    get = _slice(sites, kind, adapter.n_heads, adapter.d_head)

    def on_output(_m: nn.Module, _args: Any, out: torch.Tensor) -> Any:
        if get is None:
            return fn(out)
        part = get(out)
        new = fn(part)
        if new is None:
            return None
        replaced = out.clone()
        which = "qkv".index(kind[-1])
        if sites.qkv == "fused":
            get(replaced).copy_(new)  # a view of the q, k or v columns
        else:
            _put_interleaved(replaced, new, which, adapter.n_heads, adapter.d_head)
        return replaced

    path = {"attn.hook_q": sites.q, "attn.hook_k": sites.k, "attn.hook_v": sites.v}[kind]
    return block.get_submodule(path).register_forward_hook(on_output)


def _put_interleaved(out: torch.Tensor, new: torch.Tensor, which: int, h: int, d: int) -> None:
    per_head = out.view(*out.shape[:-1], h, 3 * d)
    per_head[..., which * d : (which + 1) * d] = new.unflatten(-1, (h, d))


def sites_for(adapter: ModelAdapter) -> HeadSites:
    """The :class:`HeadSites` of an adapter's family.

    Raises
    ------
    InputError
        If the family has none (every family of ``FAMILIES`` has: a test checks it).

    Example
    -------
    >>> from transformers import GPT2Config
    >>> from actstore.ingest.families import adapter_for
    >>> sites_for(adapter_for(GPT2Config(n_layer=1))).o
    'attn.c_proj'
    """
    try:
        return HEAD_SITES[adapter.family]
    except KeyError:
        raise InputError(
            f"family {adapter.family!r} has no per-head hook sites; per-head hooks work for "
            f"{', '.join(HEAD_SITES)}; capture blocks.L.hook_attn_out or a module: hook instead"
        ) from None
