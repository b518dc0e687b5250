"""The forward pass of one ingest batch: only the work the job asked for, done once.

Three cases, decided per job:

- **capture only** (no generation, no logit metric): :func:`forward_batch` runs
  :func:`~actstore.ingest.hooks.run_capture`, which stops the model as soon as the
  last captured hook (in forward-execution order) has fired: later layers, the
  final norm and the LM head are never run. Stopping cannot change a captured
  value (a forward pass computes each activation from earlier ones only), so the
  stored values are bit-identical to those of a full pass. An edit hooked on a
  module after the last captured hook is skipped with the rest; it could not
  have changed what is captured.
- **logits needed** (:func:`needs_logits`: logit metrics): the whole model runs,
  once, capturing on the way.
- **generation** (:func:`rides_on_generation`): capture rides on the prompt pass
  ("prefill") of :func:`~actstore.ingest.generate.generate`, so the prompt goes
  through the model once, not twice. The prefill runs the left-padded prompts
  with the capture pass's positions (pads at 0, see
  :func:`~actstore.ingest.generate.generate`), a KV cache and (with
  ``num_samples`` > 1) each prompt repeated ``num_samples`` times; the rows of the
  first copy of each prompt are taken. It computes bit-identically what a
  separate left-padded capture pass computes (tested for every family, also with
  ``num_samples`` > 1). A job with ``padding_side = "right"`` gets the left-padded
  layout's values: positions count real tokens only and masked keys weigh
  exactly zero, so they are the same numbers up to the order of float sums (on
  CPU bit-identical in the tests; on other kernels equal within float tolerance).
  Logit metrics need the logits at every prompt position, but ``generate``
  computes them at the last one only; they are computed from the prefill's final
  norm output by the LM head (and Gemma 2's soft-capping) exactly as the model's
  forward does, bit-identical to the full pass's.

  Not riding: when ``completion`` positions are captured. Their activations need
  the generated tokens as input, which the prefill has not seen; generation
  computes them one token per step against a KV cache, with other kernel shapes
  than a whole-sequence pass, and never feeds the last generated token back at
  all. So prompt and completion are run again as one sequence, as before (the
  cost of that second pass is measured in ``docs/CAPTURE_PASS.md``). Also not
  riding, as a guard: a prefill that did not cover the whole padded batch (a
  chunked prefill) or, where logits are needed, a model without a family adapter
  or with an edit hooked on its LM head; then the batch is captured by a
  separate pass.

Example
-------
>>> acts, logits = forward_batch(model, hooks, inputs, logits=False)  # doctest: +SKIP
>>> logits is None  # doctest: +SKIP
True
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import torch

from actstore.errors import InputError
from actstore.ingest.hooks import adapter_for, capture, run_capture

__all__ = [
    "Prefill",
    "forward_batch",
    "host_arrays",
    "needs_logits",
    "prefill_capture",
    "rides_on_generation",
    "stored_rows",
]


def needs_logits(metrics: Sequence[Any], token_diffs: bool = False) -> bool:
    """Whether a batch's forward pass must run to the logits (the one place this is decided).

    Parameters
    ----------
    metrics
        The run's logit metrics (the job's and its edit's).
    token_diffs
        Whether the run computes per-token diffs in its capture pass
        (:mod:`actstore.ingest.token_kl`): they need every position's logits.

    Example
    -------
    >>> needs_logits(()), needs_logits(("a metric",)), needs_logits((), token_diffs=True)
    (False, True, True)
    """
    return len(metrics) > 0 or token_diffs


def rides_on_generation(job: Any) -> bool:
    """Whether capture can take the prompt pass of generation instead of a pass of its own.

    Parameters
    ----------
    job
        An :class:`~actstore.ingest.job.IngestJob`.

    Example
    -------
    >>> from types import SimpleNamespace as NS
    >>> rides_on_generation(NS(generate=object(), capture=NS(positions=("all",))))
    True
    >>> rides_on_generation(NS(generate=object(), capture=NS(positions=("completion",))))
    False
    """
    return job.generate is not None and "completion" not in job.capture.positions


@dataclass
class Prefill:
    """What the first forward pass of a ``generate`` call computed at the hooks."""

    hooks: list[str]
    model: Any
    keep_logits: bool
    acts: dict[str, torch.Tensor] = field(default_factory=dict)
    normed: torch.Tensor | None = None
    """The final norm's output (``keep_logits``): ``generate`` computes logits at the
    last position only, so the other positions' logits are computed from this."""
    calls: int = 0

    def take(
        self, n_prompts: int, n_cols: int
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None] | None:
        """The activations (and logits) of the first copy of each prompt, or None.

        None when the prefill did not cover the whole ``n_prompts x n_cols`` batch,
        or logits are wanted and cannot be computed exactly as the model computes
        them (no family adapter, or hooks on the unembedding): the caller then runs
        a capture pass of its own.

        Example
        -------
        >>> Prefill(["h"], None, False).take(2, 3) is None  # nothing ran
        True
        """
        if self.calls == 0 or any(h not in self.acts for h in self.hooks):
            return None
        n_rows = int(self.acts[self.hooks[0]].shape[0])
        if n_prompts == 0 or n_rows % n_prompts:
            return None
        reps = n_rows // n_prompts
        if any(a.shape[:2] != (n_rows, n_cols) for a in self.acts.values()):
            return None
        logits_BSV = None
        if self.keep_logits:
            if self.normed is None or self.normed.shape[:2] != (n_rows, n_cols):
                return None
            logits_BSV = _unembed(self.model, self.normed[::reps])
            if logits_BSV is None:
                return None
        return {h: self.acts[h][::reps] for h in self.hooks}, logits_BSV


def _unembed(model: Any, normed_BSD: torch.Tensor) -> torch.Tensor | None:
    """The model's logits from its final norm's output, computed as its forward computes
    them (the LM head, then Gemma 2's soft-capping in the same three steps); None where
    that is not known exactly (no family adapter, or an edit hooked on the LM head)."""
    try:
        adapter = adapter_for(model)
        head = adapter.unembed(model)
    except InputError:
        return None
    if head._forward_hooks or head._forward_pre_hooks:
        return None
    with torch.inference_mode():
        logits_BSV = head(normed_BSD)
        cap = adapter.logit_softcap
        if cap is not None:
            logits_BSV = logits_BSV / cap
            logits_BSV = torch.tanh(logits_BSV)
            logits_BSV = logits_BSV * cap
    return logits_BSV


@contextmanager
def prefill_capture(model: Any, hooks: Sequence[str], *, logits: bool) -> Iterator[Prefill]:
    """Record the hooks (and what gives the logits) of the first forward pass in the block.

    Parameters
    ----------
    model
        The model ``generate`` runs.
    hooks
        Hook names; validated before any is registered.
    logits
        Also keep what :meth:`Prefill.take` needs to compute that pass's logits.

    Yields
    ------
    Prefill
        Filled when the first pass ends; later passes (decoding steps) are not kept.

    Example
    -------
    >>> with prefill_capture(model, ["blocks.0.hook_resid_post"], logits=False) as pre:  # doctest: +SKIP
    ...     gens = generate(model, tok, prompts, spec)
    >>> acts, _ = pre.take(len(prompts), n_cols)  # doctest: +SKIP
    """
    got = Prefill(list(dict.fromkeys(hooks)), model, logits)

    def on_output(_m: Any, _args: Any, _output: Any) -> None:
        if got.calls == 0:
            got.acts = dict(hooked)
        got.calls += 1

    def on_norm(_m: Any, _args: Any, output: Any) -> None:
        if got.calls == 0 and isinstance(output, torch.Tensor):
            got.normed = output

    handles = []
    with capture(model, got.hooks) as hooked:
        try:
            if logits:
                with suppress(InputError):
                    norm = adapter_for(model).final_norm(model)
                    handles.append(norm.register_forward_hook(on_norm))
            handles.append(model.register_forward_hook(on_output))
            yield got
        finally:
            for handle in handles:
                handle.remove()


def forward_batch(
    model: Any, hooks: Sequence[str], inputs: dict[str, torch.Tensor], *, logits: bool
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """One batch's capture pass: up to the last hook, or (``logits``) the whole model.

    The pass builds no KV cache (``use_cache=False``): nothing decodes after it, and
    filling the cache copies every layer's keys and values.

    Parameters
    ----------
    model
        The model (inside ``torch.inference_mode`` and any edit's intervention).
    hooks
        Hook names.
    inputs
        ``input_ids``, ``attention_mask``, ``position_ids``.
    logits
        :func:`needs_logits`: run to the LM head and return the logits.

    Returns
    -------
    acts, logits_BSV
        Hook name -> ``acts_BSD`` in the order of ``hooks``; the logits or None.

    Example
    -------
    >>> acts, logits_BSV = forward_batch(model, hooks, inputs, logits=True)  # doctest: +SKIP
    """
    # nothing reads a KV cache of the capture pass
    if not logits:
        return run_capture(model, hooks, **inputs, use_cache=False), None
    with capture(model, hooks) as hooked:
        logits_BSV = model(**inputs, use_cache=False).logits
    return {h: hooked[h] for h in hooks}, logits_BSV


def stored_rows(
    acts: dict[str, torch.Tensor], sels: Sequence[Any], offs: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Each hook's stored rows ``acts_ND``, in batch then position order.

    When every cell of the padded batch is stored (``all`` positions, no padding)
    the rows are a view of the activations, not a copy: the cast to the store
    dtype (:func:`host_arrays`) is then the only copy.

    Parameters
    ----------
    acts
        Hook name -> ``acts_BSD`` of the batch.
    sels
        Each prompt's :class:`~actstore.ingest.positions.Selection`.
    offs
        Column of each prompt's first token.

    Example
    -------
    >>> from actstore.ingest.positions import Selection
    >>> sel = Selection([False, True], ["prompt", "last"], [False, False])
    >>> stored_rows({"h": torch.arange(3.0).reshape(1, 3, 1)}, [sel], torch.tensor([1]))["h"]
    tensor([[2.]])
    """
    if not acts:
        return {}
    first = next(iter(acts.values()))
    n_b, n_s = int(first.shape[0]), int(first.shape[1])
    stored_BS = stored_mask(sels, offs, n_b, n_s)
    if bool(stored_BS.all()):
        return {h: a.reshape(n_b * n_s, a.shape[-1]) for h, a in acts.items()}
    stored_BS = stored_BS.to(first.device)
    return {h: a[stored_BS] for h, a in acts.items()}


def stored_mask(sels: Sequence[Any], offs: torch.Tensor, n_b: int, n_s: int) -> torch.Tensor:
    """Which (prompt, padded position) cells of a batch are stored rows: ``stored_BS``.

    Parameters
    ----------
    sels
        Each prompt's :class:`~actstore.ingest.positions.Selection`.
    offs
        Column of each prompt's first token.
    n_b, n_s
        The padded batch's shape.

    Example
    -------
    >>> from actstore.ingest.positions import Selection
    >>> sel = Selection([False, True], ["prompt", "last"], [False, False])
    >>> stored_mask([sel], torch.tensor([1]), 1, 3)
    tensor([[False, False,  True]])
    """
    stored_BS = torch.zeros((n_b, n_s), dtype=torch.bool)
    for i, (sel, off) in enumerate(zip(sels, offs.tolist(), strict=True)):
        stored_BS[i, off : off + len(sel.stored)] = torch.tensor(sel.stored, dtype=torch.bool)
    return stored_BS


def host_arrays(
    rows_ND: dict[str, torch.Tensor], store_dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], Any]:
    """Cast the rows to the store dtype (one copy; none when already so) and bring them to the host.

    On CUDA the device-to-host copies go into pinned host buffers, non-blocking,
    on a side stream that waits for the batch's work on the current stream; the
    source tensors are marked as used by that stream (so the allocator does not
    reuse them before the copy is done), and the returned event is what the
    writer thread waits for before reading the buffers. The model's stream never
    waits for the host, and the next batch's kernels overlap the copy. (This path
    is not exercised by the test suite, which runs on CPU.) On the CPU the
    arrays are returned as they are and the event is None.

    Example
    -------
    >>> arrays, ready = host_arrays({"h": torch.ones(2, 3)}, torch.float16)
    >>> arrays["h"].dtype, ready
    (torch.float16, None)
    """
    arrays = {h: r.to(store_dtype) for h, r in rows_ND.items()}
    first = next(iter(arrays.values()), None)
    if first is None or first.device.type != "cuda":
        return arrays, None
    device = first.device
    side = _SIDE_STREAMS.get(device)
    if side is None:
        side = _SIDE_STREAMS[device] = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    host: dict[str, torch.Tensor] = {}
    with torch.cuda.stream(side):
        for h, t in arrays.items():
            buf = torch.empty(tuple(t.shape), dtype=t.dtype, device="cpu", pin_memory=True)
            buf.copy_(t, non_blocking=True)
            t.record_stream(side)
            host[h] = buf
        ready = torch.cuda.Event()
        ready.record(side)
    return host, ready


_SIDE_STREAMS: dict[torch.device, Any] = {}
"""One copy stream per CUDA device."""
