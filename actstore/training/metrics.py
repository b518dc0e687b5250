"""How good an SAE is: reconstruction and sparsity on held-out rows, and loss recovered.

:func:`sae_metrics` uses the SAE's own ``encode`` and ``decode`` (any sae_lens SAE):

- ``fve``, the fraction of variance explained, ``1 - sum|x - x_hat|^2 / sum|x - mean(x)|^2``;
- ``mse``, the mean squared error per element;
- ``l0``, the mean number of active features per row;
- ``dead_fraction``, the share of features that never fire on these rows;
- ``dense_fraction``, the share that fire on more than ``dense_threshold`` of them.

:func:`loss_recovered` splices the SAE into the model at its hook (the hook's
output replaced by ``decode(encode(x))``) and compares the mean next-token loss
over prompts with the clean and the zero-ablated losses: ``(zero - sae) / (zero -
clean)``, the "loss recovered" that SAEBench and SAELens report.

Shapes: ``N`` rows, ``D`` width, ``F`` features, ``B`` batch, ``S`` sequence.

Example
-------
>>> m = sae_metrics(sae, acts_ND)  # doctest: +SKIP
>>> sorted(m)  # doctest: +SKIP
['dead_fraction', 'dense_fraction', 'fve', 'l0', 'mse', 'n_rows']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from actstore.errors import InputError

__all__ = ["DENSE_THRESHOLD", "loss_recovered", "sae_metrics"]

DENSE_THRESHOLD = 0.1
"""A feature that fires on more than this share of rows counts as dense."""


def _as_tensor(acts_ND: Any) -> torch.Tensor:
    if isinstance(acts_ND, torch.Tensor):
        x_ND = acts_ND.detach().to("cpu", torch.float32)
    else:
        try:
            x_ND = torch.from_numpy(np.asarray(acts_ND, dtype=np.float32))
        except (TypeError, ValueError) as e:
            raise InputError(f"acts_ND must be a numeric 2-D array; {e}") from e
    if x_ND.ndim != 2 or x_ND.shape[0] < 2 or x_ND.shape[1] < 1:
        raise InputError(
            f"acts_ND must be 2-D (rows, width) with at least 2 rows; got shape {tuple(x_ND.shape)}"
        )
    if not bool(torch.isfinite(x_ND).all()):
        raise InputError("acts_ND contains NaN or infinite values; drop or fix those rows first")
    return x_ND.contiguous()


@torch.no_grad()
def sae_metrics(
    sae: Any, acts_ND: Any, *, batch_size: int = 4096, dense_threshold: float = DENSE_THRESHOLD
) -> dict[str, float]:
    """Reconstruction and sparsity of a sae_lens SAE on an activation matrix.

    Parameters
    ----------
    sae
        A ``sae_lens.SAE`` (anything with ``encode`` and ``decode``), in float32.
    acts_ND
        Activations, numpy or torch, shape ``(N, D)`` (cast to float32).
    batch_size
        Rows encoded at a time.
    dense_threshold
        Firing frequency above which a feature is dense.

    Returns
    -------
    dict
        ``fve``, ``mse``, ``l0``, ``dead_fraction``, ``dense_fraction``, ``n_rows``
        (see the module docstring).

    Example
    -------
    >>> sae_metrics(sae, acts_ND)["fve"] > 0.9  # doctest: +SKIP
    True
    """
    x_ND = _as_tensor(acts_ND)
    param = next(sae.parameters())
    sq_err = 0.0
    l0_sum = 0.0
    fired_F: torch.Tensor | None = None
    for start in range(0, x_ND.shape[0], batch_size):
        xb_ND = x_ND[start : start + batch_size].to(param.device, param.dtype)
        f_NF = sae.encode(xb_ND)
        if f_NF.is_sparse:
            f_NF = f_NF.to_dense()
        sq_err += float(((sae.decode(f_NF) - xb_ND) ** 2).sum(dtype=torch.float64))
        active_NF = f_NF != 0
        l0_sum += float(active_NF.sum())
        fired = active_NF.sum(dim=0).double().cpu()
        fired_F = fired if fired_F is None else fired_F + fired
    total_var = float(((x_ND.double() - x_ND.double().mean(dim=0)) ** 2).sum())
    assert fired_F is not None
    n = x_ND.shape[0]
    return {
        "fve": 1.0 - sq_err / max(total_var, 1e-12),
        "mse": sq_err / x_ND.numel(),
        "l0": l0_sum / n,
        "dead_fraction": float((fired_F == 0).double().mean()),
        "dense_fraction": float((fired_F / n > dense_threshold).double().mean()),
        "n_rows": float(n),
    }


def _mean_loss(model: Any, prompts: Sequence[Sequence[int]], device: str, batch: int) -> float:
    """Mean over prompts of the mean next-token cross-entropy inside each prompt."""
    losses = []
    for lo in range(0, len(prompts), batch):
        chunk = [list(p) for p in prompts[lo : lo + batch] if len(p) > 1]
        if not chunk:
            continue
        n_cols = max(len(c) for c in chunk)
        ids_BS = torch.zeros((len(chunk), n_cols), dtype=torch.long)
        mask_BS = torch.zeros_like(ids_BS)
        for b, c in enumerate(chunk):  # right padding: pads follow every real token
            ids_BS[b, : len(c)] = torch.tensor(c)
            mask_BS[b, : len(c)] = 1
        ids_BS, mask_BS = ids_BS.to(device), mask_BS.to(device)
        logits_BSV = model(input_ids=ids_BS, attention_mask=mask_BS).logits.float()
        logp_BSV = torch.log_softmax(logits_BSV[:, :-1], dim=-1)
        nll_BS = -logp_BSV.gather(-1, ids_BS[:, 1:, None])[..., 0]
        valid_BS = mask_BS[:, 1:].bool()
        per_prompt = (nll_BS * valid_BS).sum(1) / valid_BS.sum(1)
        losses.extend(per_prompt.tolist())
    if not losses:
        raise InputError("loss recovered needs prompts of at least two tokens; none were given")
    return float(np.mean(losses))


@torch.no_grad()
def loss_recovered(
    model: Any,
    sae: Any,
    hook: str,
    prompts: Sequence[Sequence[int]],
    *,
    device: str = "cpu",
    batch_size: int = 8,
) -> dict[str, float]:
    """Next-token loss with the SAE spliced in at ``hook``, against clean and zero-ablated.

    Parameters
    ----------
    model
        A Hugging Face causal LM (in eval mode).
    sae
        A sae_lens SAE reading ``hook``.
    hook
        The TransformerLens hook name (see ``actstore.ingest.hooks``).
    prompts
        Token ids of each prompt.
    device, batch_size
        Where and how many prompts per forward pass.

    Returns
    -------
    dict
        ``loss_clean``, ``loss_sae``, ``loss_zero`` and ``loss_recovered`` =
        ``(loss_zero - loss_sae) / (loss_zero - loss_clean)``.

    Example
    -------
    >>> loss_recovered(model, sae, "blocks.2.hook_resid_post", [[1, 5, 7, 2]])  # doctest: +SKIP
    {'loss_clean': 2.1, 'loss_sae': 2.3, 'loss_zero': 6.0, 'loss_recovered': 0.95}
    """
    from actstore.ingest.hooks import intervene

    param = next(sae.parameters())

    def splice(name: str, a_BSD: torch.Tensor) -> torch.Tensor:
        x = a_BSD.to(param.device, param.dtype)
        f = sae.encode(x)
        if f.is_sparse:
            f = f.to_dense()
        return sae.decode(f).to(a_BSD.device, a_BSD.dtype)

    clean = _mean_loss(model, prompts, device, batch_size)
    with intervene(model, {hook: splice}):
        spliced = _mean_loss(model, prompts, device, batch_size)
    with intervene(model, {hook: lambda name, a_BSD: torch.zeros_like(a_BSD)}):
        zero = _mean_loss(model, prompts, device, batch_size)
    gap = zero - clean
    return {
        "loss_clean": clean,
        "loss_sae": spliced,
        "loss_zero": zero,
        "loss_recovered": (zero - spliced) / gap if gap != 0 else float("nan"),
    }
