"""Capture and edit a Hugging Face model's activations at TransformerLens hook points.

Hook names (``blocks.3.hook_resid_post``, ``blocks.1.mlp.hook_post``,
``module:<path>``) and where each model family computes them are defined in
:mod:`actstore.ingest.families`; this module re-exports what callers need.
:func:`expand_hooks` turns patterns (``blocks.*.hook_resid_post``,
``blocks.1-2.hook_mlp_out``) into names; :func:`capture` records activations
during forward passes; :func:`run_capture` does one pass and stops after the
last hook; :func:`intervene` replaces activations. Shapes: ``B`` batch, ``S``
sequence, ``D`` width.

Example
-------
>>> from transformers import GPT2Config, GPT2LMHeadModel
>>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=10)).eval()
>>> hooks = expand_hooks(["blocks.*.hook_resid_post"], adapter_for(model).n_layers)
>>> with capture(model, hooks) as acts:
...     _ = model(torch.tensor([[1, 2, 3]]))
>>> {name: tuple(acts_BSD.shape) for name, acts_BSD in acts.items()}
{'blocks.0.hook_resid_post': (1, 3, 16), 'blocks.1.hook_resid_post': (1, 3, 16)}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from actstore.errors import InputError
from actstore.ingest import heads as _heads
from actstore.ingest.families import (
    HOOK_KINDS,
    MODULE_PREFIX,
    ModelAdapter,
    adapter_for,
    expand_hooks,
    module_at,
    parse_hook,
)

__all__ = [
    "HOOK_KINDS",
    "MODULE_PREFIX",
    "EditFn",
    "ModelAdapter",
    "adapter_for",
    "capture",
    "expand_hooks",
    "intervene",
    "parse_hook",
    "run_capture",
]

EditFn = Callable[[str, torch.Tensor], torch.Tensor]
"""An edit: ``fn(hook_name, acts_BSD) -> acts_BSD``, returning the replacement."""


def _first_tensor(hook: str, value: Any) -> torch.Tensor:
    first = value if isinstance(value, torch.Tensor) else value[0]
    if not isinstance(first, torch.Tensor):
        raise InputError(
            f"hook {hook!r}: the value there is a {type(first).__name__}, not a tensor; "
            "hook a (sub)module whose output is a tensor"
        )
    return first


def _with_first(value: Any, new: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        return new
    if isinstance(value, tuple):
        return (new, *value[1:])
    value[next(iter(value.keys()))] = new  # a transformers ModelOutput
    return value


def _register(
    model: nn.Module,
    adapter: ModelAdapter | None,
    hook: str,
    fn: Callable[[torch.Tensor], torch.Tensor | None],
) -> RemovableHandle:
    """Call ``fn(acts)`` at a hook; a returned tensor replaces the activation."""
    if adapter is None:
        module, side = module_at(model, hook), "output"
    elif _heads.is_head_hook(hook):  # per-head hooks slice or recompute (ingest.heads)
        return _heads.register(model, adapter, hook, fn)
    else:
        module, side = adapter.site(model, hook)
    if side == "output":

        def on_output(_m: nn.Module, _args: Any, output: Any) -> Any:
            new = fn(_first_tensor(hook, output))
            return None if new is None else _with_first(output, new)

        return module.register_forward_hook(on_output)

    def on_input(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # Decoder layers take hidden_states positionally today; accept the keyword too.
        new = fn(_first_tensor(hook, args[0] if args else kwargs.get("hidden_states")))
        if new is None:
            return None
        if args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}

    return module.register_forward_pre_hook(on_input, with_kwargs=True)


def _resolve(model: nn.Module, hooks: Iterable[str]) -> tuple[list[str], ModelAdapter | None]:
    """Validate every hook before any is registered; the adapter only if one is needed."""
    names = list(dict.fromkeys(hooks))
    needs_family = any(not h.startswith(MODULE_PREFIX) for h in names)
    adapter = adapter_for(model) if needs_family else None
    for h in names:
        if adapter is not None:
            adapter.site(model, h)
        else:
            parse_hook(h)
            module_at(model, h)
    return names, adapter


@contextmanager
def _hooked(
    model: nn.Module,
    hooks: Iterable[str],
    make: Callable[[str], Callable[[torch.Tensor], torch.Tensor | None]],
) -> Iterator[list[str]]:
    names, adapter = _resolve(model, hooks)
    handles: list[RemovableHandle] = []
    try:
        for h in names:
            handles.append(_register(model, adapter, h, make(h)))
        yield names
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture(model: nn.Module, hooks: Iterable[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Record hook activations during forward passes inside the block.

    Parameters
    ----------
    model
        A HF model of a supported family, or any module when every hook is a
        ``module:`` path.
    hooks
        Hook names (see :func:`expand_hooks` for patterns). All are validated
        before any is registered.

    Yields
    ------
    dict[str, torch.Tensor]
        Filled during each forward pass, in firing order: hook name ->
        ``acts_BSD`` of the latest pass, detached but not copied (it shares
        storage with the model's tensor, so never modify it in place; e.g.
        ``blocks.0.hook_resid_post`` and ``blocks.1.hook_resid_pre`` are the
        same storage). Hooks are removed on exit, also on error.

    Notes
    -----
    Hooks on one module run in the order they were registered: a ``capture``
    entered inside an :func:`intervene` block records the edited values.

    Example
    -------
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10))
    >>> with capture(m, ["blocks.0.mlp.hook_post", "module:transformer.ln_f"]) as acts:
    ...     _ = m(torch.tensor([[1, 2]]))
    >>> [tuple(a.shape) for a in acts.values()]
    [(1, 2, 32), (1, 2, 8)]
    """
    acts: dict[str, torch.Tensor] = {}

    def make(name: str) -> Callable[[torch.Tensor], None]:
        def store(acts_BSD: torch.Tensor) -> None:
            acts[name] = acts_BSD.detach()

        return store

    with _hooked(model, hooks, make):
        yield acts


class _StopForward(Exception):
    """Raised by :func:`run_capture` once every hook has fired."""


def run_capture(
    model: nn.Module, hooks: Iterable[str], /, **inputs: Any
) -> dict[str, torch.Tensor]:
    """Run one forward pass without gradients and return the hook activations.

    The pass stops as soon as every hook has fired, so layers after the last
    hook (and the unembedding) are not computed.

    Parameters
    ----------
    model
        As for :func:`capture`.
    hooks
        Hook names.
    **inputs
        Passed to ``model(...)``, e.g. ``input_ids``, ``attention_mask``,
        ``position_ids``.

    Returns
    -------
    dict[str, torch.Tensor]
        Hook name -> ``acts_BSD``, in the order of ``hooks``.

    Raises
    ------
    InputError
        If a hook did not fire (a ``module:`` path off the forward path).

    Example
    -------
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=10))
    >>> acts = run_capture(m, ["blocks.0.hook_resid_post"], input_ids=torch.tensor([[1, 2]]))
    >>> acts["blocks.0.hook_resid_post"].shape
    torch.Size([1, 2, 8])
    """
    acts: dict[str, torch.Tensor] = {}
    names, _ = _resolve(model, hooks)

    def make(name: str) -> Callable[[torch.Tensor], None]:
        def store(acts_BSD: torch.Tensor) -> None:
            acts[name] = acts_BSD.detach()
            if len(acts) == len(names):
                raise _StopForward

        return store

    with _hooked(model, names, make), torch.no_grad(), suppress(_StopForward):
        model(**inputs)
    missing = [h for h in names if h not in acts]
    if missing:
        raise InputError(
            f"hooks {missing} did not fire during the forward pass; a module: hook must "
            "name a module the forward pass runs (see model.named_modules())"
        )
    return {h: acts[h] for h in names}


@contextmanager
def intervene(model: nn.Module, edits: Mapping[str, EditFn]) -> Iterator[None]:
    """Replace hook activations during forward passes inside the block.

    Parameters
    ----------
    model
        As for :func:`capture`.
    edits
        Hook name -> ``fn(hook_name, acts_BSD) -> acts_BSD``. The returned
        tensor, of the same shape, replaces the activation downstream. Return a
        new tensor rather than editing ``acts_BSD`` in place, which would also
        change activations already captured from the same storage. Hooks are
        removed on exit, also on error.

    Raises
    ------
    InputError
        During the forward pass, if an edit returns a tensor of another shape.

    Example
    -------
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10)).eval()
    >>> ids = torch.tensor([[1, 2]])
    >>> with intervene(m, {"blocks.0.hook_mlp_out": lambda name, a: a * 0}):
    ...     zeroed = m(ids).logits
    >>> bool(torch.equal(zeroed, m(ids).logits))
    False
    """

    def make(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        fn = edits[name]

        def edit(acts_BSD: torch.Tensor) -> torch.Tensor:
            new_BSD = fn(name, acts_BSD)
            if not isinstance(new_BSD, torch.Tensor) or new_BSD.shape != acts_BSD.shape:
                got = tuple(new_BSD.shape) if isinstance(new_BSD, torch.Tensor) else new_BSD
                raise InputError(
                    f"edit at hook {name!r} returned {got!r}, expected a tensor of shape "
                    f"{tuple(acts_BSD.shape)}; an edit must return the replacement activations"
                )
            return new_BSD

        return edit

    with _hooked(model, edits, make):
        yield
