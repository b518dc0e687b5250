"""Hook points of Hugging Face models: their names, and where each family computes them.

A hook point is a named activation of a forward pass. actstore uses
TransformerLens (TL) names, because SAEs (sae_lens) are keyed by them:

- ``blocks.{L}.hook_resid_pre``, ``blocks.{L}.hook_resid_post`` - the residual
  stream entering / leaving decoder layer ``L`` (width ``d_model``);
- ``blocks.{L}.hook_attn_out``, ``blocks.{L}.hook_mlp_out`` - what attention /
  the MLP add to the residual stream (``d_model``);
- ``blocks.{L}.mlp.hook_post`` - the MLP hidden activation, input of its output
  projection (``d_mlp``);
- ``module:<path>`` - escape hatch: the output (first element, if a tuple) of any
  module, by its ``model.named_modules()`` path.

actstore runs the HF model itself, so for each family it must know which HF
module computes the value TL would hook. A :class:`Family` records that as
module paths; :data:`FAMILIES` maps each supported ``config.model_type`` to its
family; :func:`adapter_for` binds a family to one model's sizes
(:class:`ModelAdapter`). Capturing and editing activations is
:mod:`actstore.ingest.hooks`.

The mapping, and why (``L`` = a decoder layer, paths relative to it):

============== ===================================== ================================
hook kind      HF site                               why
============== ===================================== ================================
resid_pre      input ``hidden_states`` of ``L``      TL's block input
resid_post     output of ``L``                       not HF ``hidden_states[-1]``,
                                                     which has the final norm applied
attn_out       output of :attr:`Family.attn_out`     what is added to the residual:
                                                     after the output projection and,
                                                     for Gemma 2, after the post-
                                                     attention norm (TL ``ln1_post``)
mlp_out        output of :attr:`Family.mlp_out`      likewise; Gemma 2 after
                                                     ``post_feedforward_layernorm``
mlp.hook_post  input of :attr:`Family.mlp_down`      TL ``mlp.hook_post``: act(pre)
                                                     or, gated, act(gate) * up
============== ===================================== ================================

Every family is checked against TL's own ``run_with_cache`` values in
``tests/ingest/test_hooks.py``; adding a family means adding a tiny model there.

Example
-------
>>> parse_hook("blocks.3.mlp.hook_post")
(3, 'mlp.hook_post')
>>> FAMILIES["qwen2"].name
'llama'
>>> family_for("bert")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
actstore.errors.InputError: model type 'bert' has no actstore hook adapter; ...
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from actstore.errors import HookNotFoundError, InputError
from actstore.ingest import heads as _heads

HOOK_KINDS: tuple[str, ...] = (
    "hook_resid_pre",
    "hook_attn_out",
    "hook_mlp_out",
    "mlp.hook_post",
    "hook_resid_post",
)
"""The per-layer hook kinds, in forward order."""

MODULE_PREFIX = "module:"
"""Prefix of raw module-path hook names."""

_BLOCK_RE = re.compile(r"blocks\.(?P<layers>[^.]+)\.(?P<kind>.+)")
_ALL_KINDS = (*HOOK_KINDS, *_heads.HEAD_KINDS)  # per-head kinds: actstore.ingest.heads
_KINDS_HINT = ", ".join(f"blocks.L.{k}" for k in _ALL_KINDS)


def _unknown(name: str, why: str) -> HookNotFoundError:
    return HookNotFoundError(
        f"hook {name!r} is not a hook point: {why}; valid hooks are {_KINDS_HINT} "
        "(L a layer, '*' or a range like '1-3' in patterns) or 'module:<path>'"
    )


def parse_hook(name: str) -> tuple[int | None, str]:
    """Split a hook name into its layer and kind.

    Parameters
    ----------
    name
        ``blocks.{L}.{kind}`` or ``module:<path>``.

    Returns
    -------
    tuple[int | None, str]
        ``(L, kind)``, or ``(None, "module")`` for a module path.

    Raises
    ------
    HookNotFoundError
        If the name is malformed or its kind is unknown; the message lists the
        valid kinds.

    Example
    -------
    >>> parse_hook("blocks.3.mlp.hook_post")
    (3, 'mlp.hook_post')
    >>> parse_hook("module:model.layers.1.mlp")
    (None, 'module')
    """
    if name.startswith(MODULE_PREFIX):
        if not name[len(MODULE_PREFIX) :]:
            raise _unknown(name, "the module path is empty")
        return None, "module"
    m = _BLOCK_RE.fullmatch(name)
    if m is None:
        raise _unknown(name, "it does not start with 'blocks.L.'")
    if m["kind"] not in _ALL_KINDS:
        raise _unknown(name, f"unknown kind {m['kind']!r}")
    if not m["layers"].isdigit():
        raise _unknown(name, f"layer {m['layers']!r} is not a number")
    return int(m["layers"]), m["kind"]


def check_layer(name: str, layer: int, n_layers: int) -> None:
    """Raise unless ``layer`` is a layer of a model with ``n_layers`` layers.

    Raises
    ------
    HookNotFoundError
        Naming the hook and the valid range.

    Example
    -------
    >>> check_layer("blocks.9.hook_resid_post", 9, 4)
    Traceback (most recent call last):
    ...
    actstore.errors.HookNotFoundError: hook 'blocks.9.hook_resid_post': layer 9 out of range: model has layers 0-3
    """
    if not 0 <= layer < n_layers:
        raise HookNotFoundError(
            f"hook {name!r}: layer {layer} out of range: model has layers 0-{n_layers - 1}"
        )


def expand_hooks(patterns: str | Iterable[str], n_layers: int) -> list[str]:
    """Expand hook patterns into hook names, ordered by layer then pattern.

    Parameters
    ----------
    patterns
        Hook names or patterns: ``blocks.*.KIND`` (every layer),
        ``blocks.A-B.KIND`` (``A`` to ``B`` inclusive), ``blocks.L.KIND``, and
        ``module:<path>`` (passed through, after all block hooks).
    n_layers
        Number of decoder layers of the model.

    Returns
    -------
    list[str]
        Without duplicates; block hooks sorted by layer, then by the order of
        the patterns.

    Raises
    ------
    HookNotFoundError
        For an unknown kind or a layer out of range.

    Example
    -------
    >>> expand_hooks(["blocks.*.hook_resid_post", "blocks.1-2.hook_mlp_out"], 3)
    ['blocks.0.hook_resid_post', 'blocks.1.hook_resid_post', 'blocks.1.hook_mlp_out', 'blocks.2.hook_resid_post', 'blocks.2.hook_mlp_out']
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    blocks: dict[tuple[int, int], str] = {}
    modules: dict[str, None] = {}
    for order, pattern in enumerate(patterns):
        if pattern.startswith(MODULE_PREFIX):
            parse_hook(pattern)
            modules.setdefault(pattern, None)
            continue
        m = _BLOCK_RE.fullmatch(pattern)
        spec = m["layers"] if m else ""
        if m is not None and spec == "*":
            layers: Iterable[int] = range(n_layers)
        elif m is not None and re.fullmatch(r"\d+-\d+", spec):
            lo, hi = (int(x) for x in spec.split("-"))
            if lo > hi:
                raise _unknown(pattern, f"empty layer range {spec!r}; write it low-high")
            check_layer(pattern, lo, n_layers)
            check_layer(pattern, hi, n_layers)
            layers = range(lo, hi + 1)
        else:
            layer, _ = parse_hook(pattern)
            assert layer is not None
            check_layer(pattern, layer, n_layers)
            layers = [layer]
        kind = m["kind"] if m else ""
        if kind not in _ALL_KINDS:
            raise _unknown(pattern, f"unknown kind {kind!r}")
        for layer in layers:
            blocks.setdefault((layer, order), f"blocks.{layer}.{kind}")
    names = [blocks[key] for key in sorted(blocks)]
    return list(dict.fromkeys([*names, *modules]))


def _intermediate_size(config: Any) -> int:
    return int(config.intermediate_size)


def _gpt2_d_mlp(config: Any) -> int:
    return int(config.n_inner or 4 * config.n_embd)


@dataclass(frozen=True, slots=True)
class Family:
    """Where one family's HF modules realise the TL hook points.

    Paths are dotted ``get_submodule`` paths.

    Example
    -------
    >>> GPT2.mlp_down
    'mlp.c_proj'
    """

    name: str
    """Family name shown to users, e.g. ``"llama"``."""
    layers: str
    """From the base model (``model.base_model``) to the ``ModuleList`` of decoder layers."""
    final_norm: str
    """From the base model to the norm applied before the unembedding."""
    attn_out: str
    """From a decoder layer to the module whose output is ``hook_attn_out``."""
    mlp_out: str
    """From a decoder layer to the module whose output is ``hook_mlp_out``."""
    mlp_down: str
    """From a decoder layer to the MLP output projection; its input is ``mlp.hook_post``."""
    d_mlp: Callable[[Any], int] = _intermediate_size
    """Reads the MLP width from a config."""


GPT2 = Family(
    name="gpt2",
    layers="h",
    final_norm="ln_f",
    attn_out="attn",  # returns (output, weights); output is after c_proj and resid_dropout
    mlp_out="mlp",
    mlp_down="mlp.c_proj",
    d_mlp=_gpt2_d_mlp,
)

# Pythia. With use_parallel_residual the layer adds attention and MLP outputs to
# its input separately; hooking the two dropout modules gives exactly the terms
# added, for parallel and sequential variants alike.
GPT_NEOX = Family(
    name="gpt_neox",
    layers="layers",
    final_norm="final_layer_norm",
    attn_out="post_attention_dropout",
    mlp_out="post_mlp_dropout",
    mlp_down="mlp.dense_4h_to_h",
)

LLAMA = Family(
    name="llama",
    layers="layers",
    final_norm="norm",
    attn_out="self_attn",  # returns (o_proj output, weights)
    mlp_out="mlp",
    mlp_down="mlp.down_proj",
)

# Gemma 1 has Llama's layout; its ``post_attention_layernorm`` is the pre-MLP norm.
GEMMA = Family(
    name="gemma",
    layers="layers",
    final_norm="norm",
    attn_out="self_attn",
    mlp_out="mlp",
    mlp_down="mlp.down_proj",
)

# Gemma 2 normalises each sublayer's output before adding it to the residual.
# TL applies ln1_post / ln2_post *before* hook_attn_out / hook_mlp_out, so those
# hooks are the outputs of the post norms, "that which is added to the residual".
GEMMA2 = Family(
    name="gemma",
    layers="layers",
    final_norm="norm",
    attn_out="post_attention_layernorm",
    mlp_out="post_feedforward_layernorm",
    mlp_down="mlp.down_proj",
)

FAMILIES: dict[str, Family] = {
    "gpt2": GPT2,
    "gpt_neox": GPT_NEOX,
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "gemma": GEMMA,
    "gemma2": GEMMA2,
}
"""Supported ``config.model_type`` -> :class:`Family`."""


def supported_families() -> str:
    """The supported families and their model types, for messages.

    Example
    -------
    >>> supported_families()
    'gpt2 (gpt2), gpt_neox (gpt_neox), llama (llama, mistral, qwen2), gemma (gemma, gemma2)'
    """
    by_name: dict[str, list[str]] = {}
    for model_type, fam in FAMILIES.items():
        by_name.setdefault(fam.name, []).append(model_type)
    return ", ".join(f"{name} ({', '.join(types)})" for name, types in by_name.items())


def family_for(model_type: str) -> Family:
    """The family of a ``config.model_type``.

    Parameters
    ----------
    model_type
        E.g. ``"llama"``.

    Returns
    -------
    Family

    Raises
    ------
    InputError
        If the model type is not supported; the message lists the supported
        families and points to ``module:`` hook names.

    Example
    -------
    >>> family_for("gpt_neox").final_norm
    'final_layer_norm'
    """
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise InputError(
            f"model type {model_type!r} has no actstore hook adapter; supported families: "
            f"{supported_families()}. To capture from this model anyway, name modules "
            "directly with 'module:<path>' hooks, e.g. 'module:model.layers.0.mlp' "
            "(paths as in `model.named_modules()`)"
        ) from None


@dataclass(frozen=True, slots=True)
class ModelAdapter:
    """A model's hook geometry: its family, sizes and where its hooks live.

    Build one with :func:`adapter_for`.

    Example
    -------
    >>> from transformers import LlamaConfig
    >>> config = LlamaConfig(
    ...     num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=40
    ... )
    >>> a = adapter_for(config)
    >>> (a.family, a.n_layers, a.d_model, a.hook_width("blocks.1.mlp.hook_post"))
    ('llama', 2, 16, 40)
    """

    family: str
    """Family name, e.g. ``"llama"`` for Llama, Mistral and Qwen2."""
    model_type: str
    """The HF ``config.model_type``."""
    n_layers: int
    """Number of decoder layers."""
    d_model: int
    """Residual stream width."""
    d_mlp: int
    """MLP hidden width (of ``mlp.hook_post``)."""
    logit_softcap: float | None
    """Gemma 2's final logit soft-capping ``c``: logits are ``c * tanh(z / c)`` of the
    unembedding output ``z``; ``None`` where the family has none. Logit lens needs it."""
    sites: Family
    """The family's module paths."""
    n_heads: int = 0
    """Attention (query) heads."""
    n_kv_heads: int = 0
    """Key-value heads (fewer than ``n_heads`` under grouped-query attention)."""
    d_head: int = 0
    """Width of one head."""

    def check(self, hook: str) -> tuple[int | None, str]:
        """:func:`parse_hook`, and check the layer exists in this model.

        Example
        -------
        >>> from transformers import GPT2Config
        >>> adapter_for(GPT2Config(n_layer=2)).check("blocks.1.hook_resid_pre")
        (1, 'hook_resid_pre')
        """
        layer, kind = parse_hook(hook)
        if layer is not None:
            check_layer(hook, layer, self.n_layers)
        return layer, kind

    def hook_width(self, hook: str) -> int:
        """Last-axis width of a block hook's activations: ``d_mlp`` or ``d_model``.

        Raises
        ------
        InputError
            For a ``module:`` hook, whose width depends on the module.

        Example
        -------
        >>> from transformers import GPT2Config
        >>> adapter_for(GPT2Config(n_embd=8, n_head=2)).hook_width("blocks.0.mlp.hook_post")
        32
        """
        _, kind = self.check(hook)
        if kind == "module":
            raise InputError(
                f"hook {hook!r}: the width of a module hook is not known before a forward "
                "pass; capture it once and read acts_BSD.shape[-1]"
            )
        if kind in _heads.HEAD_KINDS:
            n, d = _heads.head_layout(self, hook)
            return n * d
        return self.d_mlp if kind == "mlp.hook_post" else self.d_model

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm the model applies to the last residual before unembedding.

        Example
        -------
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2))
        >>> adapter_for(m).final_norm(m) is m.transformer.ln_f
        True
        """
        return _base(model).get_submodule(self.sites.final_norm)

    def unembed(self, model: nn.Module) -> nn.Module:
        """The unembedding (``lm_head``) mapping normed residuals to logits.

        Raises
        ------
        InputError
            If ``model`` is a base model without a language-model head.

        Example
        -------
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2))
        >>> adapter_for(m).unembed(m) is m.lm_head
        True
        """
        get = getattr(model, "get_output_embeddings", None)
        head = get() if get is not None else None
        if not isinstance(head, nn.Module):
            raise InputError(
                f"{type(model).__name__} has no unembedding (lm_head); load the model "
                "with AutoModelForCausalLM rather than AutoModel"
            )
        return head

    def layer(self, model: nn.Module, layer: int) -> nn.Module:
        """Decoder layer ``layer`` of ``model``.

        Example
        -------
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=8, n_head=2))
        >>> adapter_for(m).layer(m, 1) is m.transformer.h[1]
        True
        """
        layers = _base(model).get_submodule(self.sites.layers)
        assert isinstance(layers, nn.ModuleList)
        return layers[layer]

    def site(self, model: nn.Module, hook: str) -> tuple[nn.Module, Literal["input", "output"]]:
        """The module computing a hook, and whether the hook is its input or output.

        Example
        -------
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=8, n_head=2))
        >>> module, side = adapter_for(m).site(m, "blocks.1.mlp.hook_post")
        >>> module is m.transformer.h[1].mlp.c_proj, side
        (True, 'input')
        """
        layer, kind = self.check(hook)
        if layer is None:
            return module_at(model, hook), "output"
        block = self.layer(model, layer)
        if kind in _heads.HEAD_KINDS:  # registered by actstore.ingest.heads.register
            return block.get_submodule(_heads.sites_for(self).attn), "output"
        if kind == "hook_resid_pre":
            return block, "input"
        if kind == "hook_resid_post":
            return block, "output"
        if kind == "mlp.hook_post":
            return block.get_submodule(self.sites.mlp_down), "input"
        path = self.sites.attn_out if kind == "hook_attn_out" else self.sites.mlp_out
        return block.get_submodule(path), "output"


def _base(model: nn.Module) -> nn.Module:
    """The decoder stack of a HF model, with or without its LM head."""
    base = getattr(model, "base_model", model)
    return base if isinstance(base, nn.Module) else model


def adapter_for(model_or_config: Any) -> ModelAdapter:
    """The :class:`ModelAdapter` of a HF model or config.

    Parameters
    ----------
    model_or_config
        A ``transformers`` model (anything with ``.config``) or a
        ``PretrainedConfig``.

    Returns
    -------
    ModelAdapter

    Raises
    ------
    InputError
        If ``config.model_type`` is not a supported family; the message lists
        them and suggests ``module:`` hooks.

    Example
    -------
    >>> from transformers import GPT2Config
    >>> adapter_for(GPT2Config(n_layer=4)).n_layers
    4
    """
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model_type, str):
        raise InputError(
            f"{type(model_or_config).__name__} is not a Hugging Face model or config "
            "(it has no config.model_type); pass the model from AutoModelForCausalLM"
        )
    sites = family_for(model_type)
    return ModelAdapter(
        family=sites.name,
        model_type=model_type,
        n_layers=int(config.num_hidden_layers),
        d_model=int(config.hidden_size),
        d_mlp=sites.d_mlp(config),
        logit_softcap=getattr(config, "final_logit_softcapping", None),
        sites=sites,
        **dict(zip(("n_heads", "n_kv_heads", "d_head"), _heads.head_geometry(config), strict=True)),
    )


def module_at(model: nn.Module, hook: str) -> nn.Module:
    """The module a ``module:<path>`` hook names.

    Raises
    ------
    HookNotFoundError
        If the path does not exist; the message lists the children of the
        deepest module that does.

    Example
    -------
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    >>> module_at(net, "module:1")
    ReLU()
    """
    parts = hook[len(MODULE_PREFIX) :].split(".")
    module = model
    for i, part in enumerate(parts):
        children = dict(module.named_children())
        if part not in children:
            where = ".".join(parts[:i]) or type(model).__name__
            raise HookNotFoundError(
                f"hook {hook!r}: {where} has no submodule {part!r} (its children: "
                f"{', '.join(children) or 'none'}); see model.named_modules() for valid paths"
            )
        module = children[part]
    return module
