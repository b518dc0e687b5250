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
and patterns are recomputed from the query and key states HF hands its
attention function (after rotary), with HF's own scaling, soft-cap and mask: the
attention function of the model's implementation (``eager``, ``sdpa``...) is
wrapped through transformers' ``AttentionInterface`` for as long as such a hook
is registered, and calls the original for the output.

Example
-------
>>> is_head_hook("blocks.0.attn.hook_z"), is_attention_hook("blocks.0.attn.hook_pattern")
(True, True)
>>> AttentionKeep.parse("top:5")
AttentionKeep(rule='top', value=5.0)
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from actstore.errors import InputError, SpecError

if TYPE_CHECKING:
    from actstore.ingest.families import ModelAdapter

__all__ = [
    "ATTENTION_COLUMNS",
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
ATTENTION_KINDS: tuple[str, ...] = ("attn.hook_attn_scores", "attn.hook_pattern")
"""Per-head kinds over (query, key) pairs, stored sparse in the ``attention`` table."""
HEAD_KINDS: tuple[str, ...] = (*DENSE_HEAD_KINDS, *ATTENTION_KINDS)
"""Every per-head kind, in forward order."""

ATTENTION_COLUMNS = (
    "run_id INTEGER",
    '"row" BIGINT',
    "layer INTEGER",
    "head INTEGER",
    "key_position INTEGER",
    "weight REAL",
    "score REAL",
)
"""The catalog table ``attention``: one row per kept (query row, layer, head, key)."""

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


def is_attention_hook(hook: str) -> bool:
    """Whether ``hook`` is ``hook_pattern`` or ``hook_attn_scores`` (stored sparse).

    Example
    -------
    >>> is_attention_hook("blocks.0.attn.hook_attn_scores"), is_attention_hook("blocks.0.attn.hook_q")
    (True, False)
    """
    return _kind(hook) in ATTENTION_KINDS


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


# --- capture ----------------------------------------------------------------------------

Fn = Callable[[torch.Tensor], "torch.Tensor | None"]


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


class _Handle:
    """A removable registration, like torch's ``RemovableHandle``."""

    def __init__(self, remove: Callable[[], None]) -> None:
        self._remove: Callable[[], None] | None = remove

    def remove(self) -> None:
        if self._remove is not None:
            self._remove()
            self._remove = None


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
        return _register_attention(hook, block.get_submodule(sites.attn), kind, fn)
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
        return previous  # type: ignore[no-any-return]
    glob = type(_interface())._global_mapping
    if impl in glob:
        return glob[impl]  # type: ignore[no-any-return]
    return sys.modules[type(module).__module__].eager_attention_forward  # type: ignore[no-any-return]


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


def _register_attention(hook: str, module: nn.Module, kind: str, fn: Fn) -> _Handle:
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
        HF's mask as passed: ``None`` (causal), boolean (True = attend) or additive.
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
    if mask is None:
        allowed = torch.ones(n_q, n_k, dtype=torch.bool, device=scores.device).tril(n_k - n_q)
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
            by_layer.setdefault(int(hook.split(".")[1]), {})[_kind(hook)] = value
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
