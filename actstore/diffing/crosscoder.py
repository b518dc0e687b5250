"""BatchTopK crosscoders: one sparse dictionary over the aligned activations of several runs.

A crosscoder (Lindsey et al., 2024) reads the activations of M models at the same
token and writes one reconstruction per model through its own decoder:

    f_BF = BatchTopK(ReLU(sum_m x_BMD[:, m] @ W_enc_MDF[m] + b_enc_F))
    xhat_BMD[:, m] = f_BF @ W_dec_FMD[:, m] + b_dec_MD[m]

A latent whose decoder is large for one model only is that model's own. Minder et
al. (2025) showed that L1-penalised crosscoders mislabel shared latents as
exclusive and that BatchTopK fixes it: keep the ``k * B`` largest values of
``f_BF * sum_m ||W_dec_FMD[:, m]||`` in the batch (no sparsity penalty), train on the
summed squared error of all models plus the AuxK loss of Gao et al. (dead latents
reconstruct the residual), and at inference replace the batch selection by the
threshold the training batches selected at (a running mean of the smallest selected
score), so a token's latents do not depend on its batch. That is what
:func:`train_crosscoder` implements, on torch. (``dictionary_learning`` on PyPI,
0.1.0, has no crosscoder and pins nnsight < 0.4.)

The training rows are the aligned rows of the runs at one hook (same prompt set and
positions: rows line up token by token), chosen by a predicate; whole prompts are
held out for evaluation. Each run's activations are scaled by one number so their
mean squared norm is ``D`` (Minder et al.); the scales are part of the crosscoder.

Latents are classified by the **relative decoder norm**: with ``n_m = ||W_dec[f, m]||``
and ``rel_m = n_m / max_m n_m``, a latent is ``only:{run}`` when that run's
``rel`` is 1 and every other is below 0.2 (for two runs: Minder et al.'s
``delta_norm > 0.9`` or ``< 0.1``), ``shared`` when every ``rel`` is at least
2/3 (``0.4 <= delta_norm <= 0.6``), ``dead`` when it never fires on the training
rows, else ``other``. For two runs ``delta_norm = 0.5 ((n_B - n_A) / max(n_A, n_B) + 1)``.

:func:`actstore.diffing.crosscoder_store.store_crosscoder` saves the weights in the store (``crosscoders/{name}/``,
safetensors + ``cfg.json``, hash in ``saes.weights_hash``), registers the
crosscoder in ``saes`` (architecture ``batchtopk_crosscoder``) and stores its latents'
activations on every row of every run as sparse features (identical values under
each run), so the named queries (``trigger_diff``, ``top_activations``...) work on
it from any of its runs; the per-latent norms and classes go to ``crosscoder_latents``.

Shapes: ``B`` batch rows, ``M`` runs, ``D`` hook width, ``F`` latents, ``N`` rows.

Example
-------
>>> cc = train_crosscoder(st, ["base/pairs", "backdoored/pairs"], "blocks.2.hook_resid_post")  # doctest: +SKIP
>>> cc.fve_test  # doctest: +SKIP
{'base/pairs': 0.93, 'backdoored/pairs': 0.91}
>>> store_crosscoder(st, cc, name="cc_l2")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from actstore.errors import InputError, SpecError

if TYPE_CHECKING:
    from actstore.store.store import Store

ARCHITECTURE = "batchtopk_crosscoder"


@dataclass(frozen=True)
class CrosscoderConfig:
    """How a crosscoder is trained.

    Example
    -------
    >>> CrosscoderConfig(d_dict=128, k=8).k
    8
    """

    d_dict: int = 256
    """Number of latents ``F``."""
    k: int = 16
    """Mean active latents per token (BatchTopK keeps ``k * B`` per batch)."""
    steps: int = 3000
    """Optimizer steps."""
    batch_size: int = 256
    """Rows per step."""
    lr: float = 1e-3
    """Adam learning rate (linearly decayed to 0 over the last fifth of training)."""
    aux_k: int = 64
    """Dead latents the AuxK loss uses per row."""
    aux_alpha: float = 1 / 32
    """Weight of the AuxK loss."""
    dead_steps: int = 200
    """Steps without firing after which a latent counts as dead (for AuxK)."""
    holdout: float = 0.2
    """Share of prompts held out for evaluation."""
    seed: int = 0
    """Seeds the initialisation, the split and the batch order."""

    def __post_init__(self) -> None:
        for name in ("d_dict", "k", "steps", "batch_size", "aux_k", "dead_steps"):
            if getattr(self, name) < 1:
                raise SpecError(f"crosscoder {name} must be >= 1, got {getattr(self, name)}")
        if self.k > self.d_dict:
            raise SpecError(f"crosscoder k={self.k} is more than d_dict={self.d_dict} latents")
        if not 0.0 < self.holdout < 1.0:
            raise SpecError(f"crosscoder holdout must be in (0, 1), got {self.holdout}")


class BatchTopKCrosscoder(nn.Module):
    """The crosscoder module: per-run encoders summed into one code, per-run decoders."""

    threshold: torch.Tensor
    """Inference threshold on ``pre * sum_m ||W_dec[f, m]||`` (a buffer)."""
    scales_M: torch.Tensor
    """Per-run input scale (a buffer): the crosscoder reads ``x * scales_M[m]``."""

    def __init__(self, n_runs: int, d_in: int, d_dict: int, k: int) -> None:
        super().__init__()
        self.k = k
        self.W_enc_MDF = nn.Parameter(torch.zeros(n_runs, d_in, d_dict))
        self.b_enc_F = nn.Parameter(torch.zeros(d_dict))
        self.W_dec_FMD = nn.Parameter(torch.zeros(d_dict, n_runs, d_in))
        self.b_dec_MD = nn.Parameter(torch.zeros(n_runs, d_in))
        self.register_buffer("threshold", torch.tensor(-1.0))
        self.register_buffer("scales_M", torch.ones(n_runs))

    def init_weights(self, gen: torch.Generator) -> None:
        """Random unit-ish decoder rows, encoder its transpose (Minder et al.)."""
        F, M, D = self.W_dec_FMD.shape
        with torch.no_grad():
            W = torch.randn(F, M, D, generator=gen)
            W = W / W.norm(dim=-1, keepdim=True) * 0.1
            self.W_dec_FMD.copy_(W)
            self.W_enc_MDF.copy_(W.permute(1, 2, 0))

    def decoder_norms_FM(self) -> torch.Tensor:
        """``||W_dec[f, m]||``."""
        return self.W_dec_FMD.norm(dim=-1)

    def pre_BF(self, x_BMD: torch.Tensor) -> torch.Tensor:
        """ReLU'd encoder pre-activations."""
        return torch.relu(torch.einsum("bmd,mdf->bf", x_BMD, self.W_enc_MDF) + self.b_enc_F)

    def encode(self, x_BMD: torch.Tensor, *, batch_topk: bool = False) -> torch.Tensor:
        """Latent activations: the batch's top ``k * B`` scores, or the learned threshold."""
        pre = self.pre_BF(x_BMD)
        score = pre * self.decoder_norms_FM().sum(-1)
        if batch_topk:
            n = min(self.k * x_BMD.shape[0], score.numel())
            top = score.flatten().topk(n)
            mask = torch.zeros_like(score).flatten()
            mask[top.indices] = 1.0
            return pre * mask.view_as(pre)
        return pre * (score > self.threshold)

    def decode(self, f_BF: torch.Tensor) -> torch.Tensor:
        """Per-run reconstructions ``(B, M, D)``."""
        return torch.einsum("bf,fmd->bmd", f_BF, self.W_dec_FMD) + self.b_dec_MD


@dataclass
class Crosscoder:
    """A trained crosscoder with its data, held-out reconstruction and latent classes."""

    module: BatchTopKCrosscoder
    runs: list[str]
    hook: str
    where: str | None
    config: CrosscoderConfig
    fve_train: dict[str, float]
    fve_test: dict[str, float]
    l0_test: float
    classes: list[str]
    delta_norm: np.ndarray | None
    decoder_norms_FM: np.ndarray
    fire_rate: np.ndarray
    test_prompts: list[int]
    history: list[float] = field(default_factory=list)

    def encode(self, x_NMD: np.ndarray, batch_rows: int = 4096) -> np.ndarray:
        """Latent activations ``(N, F)`` of raw (unscaled) aligned activations.

        Example
        -------
        >>> f_NF = cc.encode(np.stack([acts_a, acts_b], 1))  # doctest: +SKIP
        """
        out = []
        with torch.no_grad():
            for lo in range(0, len(x_NMD), batch_rows):
                x = torch.as_tensor(x_NMD[lo : lo + batch_rows], dtype=torch.float32)
                out.append(self.module.encode(x * self.module.scales_M[None, :, None]).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.config.d_dict), np.float32)

    def counts(self) -> dict[str, int]:
        """Latents per class."""
        out: dict[str, int] = {}
        for c in self.classes:
            out[c] = out.get(c, 0) + 1
        return dict(sorted(out.items()))


def aligned_rows(
    store: Store, runs: Sequence[str], hook: str, where: str | None = None
) -> tuple[np.ndarray, pa.Table, list[np.ndarray]]:
    """``(N, M, D)`` float32 activations of several runs at one hook, rows checked to align.

    Returns the stacked activations, the first run's row metadata and each run's row numbers.

    Example
    -------
    >>> x_NMD, meta, rows = aligned_rows(st, ["base/pairs", "backdoored/pairs"], "blocks.2.hook_resid_post")  # doctest: +SKIP
    """
    if len(runs) < 2 or len(set(runs)) != len(runs):
        raise InputError(f"a crosscoder needs two or more distinct runs, got {list(runs)}")
    sets = {
        store.sql("SELECT prompt_set_id FROM runs WHERE run_id = ?", [store.run_id(r)]).fetchall()[
            0
        ][0]
        for r in runs
    }
    if len(sets) != 1:
        raise InputError(
            f"runs {list(runs)} are over different prompt sets; a crosscoder needs the same "
            "prompts through every model so that rows align"
        )
    acts = [store.acts(r, hook, where=where) for r in runs]
    keys = ["prompt_idx", "position"]
    for r, a in zip(runs[1:], acts[1:], strict=True):
        if not a.meta.select(keys).equals(acts[0].meta.select(keys)):
            raise InputError(
                f"runs {runs[0]!r} and {r!r} store different tokens at {hook!r}; rows must "
                "align (same prompts and positions policy)"
            )
    if len(acts[0].rows) == 0:
        raise InputError(f"where={where!r} selects no stored rows of {runs[0]!r} at {hook!r}")
    x_NMD = np.stack([a.numpy(np.float32) for a in acts], axis=1)
    return x_NMD, acts[0].meta, [np.asarray(a.rows) for a in acts]


def fve(x_NMD: np.ndarray, xhat_NMD: np.ndarray) -> np.ndarray:
    """Fraction of variance explained per run: ``1 - SSE / SS around the mean``.

    Example
    -------
    >>> x = np.random.default_rng(0).normal(size=(50, 2, 4))
    >>> fve(x, x).tolist()
    [1.0, 1.0]
    """
    err = ((x_NMD - xhat_NMD) ** 2).sum(axis=(0, 2))
    tot = ((x_NMD - x_NMD.mean(0, keepdims=True)) ** 2).sum(axis=(0, 2))
    return 1.0 - err / tot


def classify(norms_FM: np.ndarray, fired_F: np.ndarray, runs: Sequence[str]) -> list[str]:
    """Latent classes from decoder norms: ``only:{run}``, ``shared``, ``other`` or ``dead``.

    Example
    -------
    >>> classify(np.array([[1.0, 0.05], [1.0, 0.9], [1.0, 0.5]]), np.ones(3, bool), ["a", "b"])
    ['only:a', 'shared', 'other']
    """
    top = norms_FM.max(1, keepdims=True)
    rel_FM = np.divide(norms_FM, top, out=np.zeros_like(norms_FM), where=top > 0)
    out = []
    for f, rel in enumerate(rel_FM):
        if not fired_F[f]:
            out.append("dead")
            continue
        m = int(rel.argmax())
        others = np.delete(rel, m)
        if (others < 0.2).all():
            out.append(f"only:{runs[m]}")
        elif (rel >= 2 / 3).all():
            out.append("shared")
        else:
            out.append("other")
    return out


def _prompt_split(meta: pa.Table, holdout: float, seed: int) -> tuple[np.ndarray, list[int]]:
    prompts = np.unique(meta.column("prompt_idx").to_numpy())
    rng = np.random.default_rng(seed)
    n_test = max(1, round(holdout * prompts.size))
    test = np.sort(rng.permutation(prompts)[:n_test])
    if n_test >= prompts.size:
        raise InputError(
            f"only {prompts.size} prompts: nothing left to train on after holding out {n_test}"
        )
    return np.isin(meta.column("prompt_idx").to_numpy(), test), [int(p) for p in test]


def train_crosscoder(
    store: Store,
    runs: Sequence[str],
    hook: str,
    *,
    where: str | None = None,
    config: CrosscoderConfig | None = None,
) -> Crosscoder:
    """Train a BatchTopK crosscoder on the aligned rows of two or more runs at one hook.

    Parameters
    ----------
    store
        The store.
    runs
        Run names over one prompt set with the same positions (rows align).
    hook
        The hook stored by every run.
    where
        A predicate over ``labeled_tokens`` choosing the rows (default: all).
    config
        Sizes and schedule (:class:`CrosscoderConfig`).

    Returns
    -------
    Crosscoder
        With held-out fraction of variance explained per run (``fve_test``),
        latent classes and decoder norms.

    Example
    -------
    >>> cc = train_crosscoder(st, ["base/pairs", "backdoored/pairs"], "blocks.2.hook_resid_post")  # doctest: +SKIP
    >>> cc.counts()  # doctest: +SKIP
    """
    cfg = config or CrosscoderConfig()
    runs = list(runs)
    x_NMD, meta, _ = aligned_rows(store, runs, hook, where)
    is_test, test_prompts = _prompt_split(meta, cfg.holdout, cfg.seed)
    train, test = x_NMD[~is_test], x_NMD[is_test]
    N, M, D = train.shape
    scales_M = np.sqrt(D / (train.astype(np.float64) ** 2).sum(-1).mean(0))
    gen = torch.Generator().manual_seed(cfg.seed)
    cc = BatchTopKCrosscoder(M, D, cfg.d_dict, cfg.k)
    cc.init_weights(gen)
    cc.scales_M.copy_(torch.as_tensor(scales_M, dtype=torch.float32))
    xs = torch.as_tensor(train) * cc.scales_M[None, :, None]
    with torch.no_grad():
        cc.b_dec_MD.copy_(xs.mean(0))
    opt = torch.optim.Adam(cc.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    decay_from = int(cfg.steps * 0.8)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: 1.0 if s < decay_from else max(0.0, (cfg.steps - s) / (cfg.steps - decay_from)),
    )
    since_fired = torch.zeros(cfg.d_dict)
    thresholds: list[float] = []
    history: list[float] = []
    bs = min(cfg.batch_size, N)
    for step in range(cfg.steps):
        idx = torch.randint(0, N, (bs,), generator=gen)
        x = xs[idx]
        pre = cc.pre_BF(x)
        norms_F = cc.decoder_norms_FM().sum(-1)
        score = pre * norms_F
        n_keep = min(cfg.k * bs, score.numel())
        top = score.flatten().topk(n_keep)
        mask = torch.zeros_like(score).flatten()
        mask[top.indices] = 1.0
        f = pre * mask.view_as(pre)
        xhat = cc.decode(f)
        err = x - xhat
        loss = err.pow(2).sum(-1).sum(-1).mean()
        fired = (f > 0).any(0)
        since_fired = torch.where(fired, torch.zeros_like(since_fired), since_fired + 1)
        dead = since_fired >= cfg.dead_steps
        if dead.any():  # AuxK: the dead latents' top aux_k reconstruct the residual error
            aux_score = torch.where(dead[None, :], score, torch.full_like(score, -1.0))
            kk = min(cfg.aux_k, int(dead.sum()))
            vals, ind = aux_score.topk(kk, dim=-1)
            f_aux = torch.zeros_like(pre).scatter(-1, ind, pre.gather(-1, ind) * (vals > 0))
            e_aux = torch.einsum("bf,fmd->bmd", f_aux, cc.W_dec_FMD)
            resid = err.detach()
            aux = (resid - e_aux).pow(2).sum(-1).sum(-1).mean()
            loss = loss + cfg.aux_alpha * aux / resid.pow(2).sum(-1).sum(-1).mean().clamp_min(1e-9)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            sel = top.values[top.values > 0]
            if sel.numel():
                thresholds.append(float(sel.min()))
        if step % 100 == 0 or step == cfg.steps - 1:
            history.append(float(loss.detach()))
    # inference threshold: the mean smallest selected score over the last half of training
    tail = thresholds[len(thresholds) // 2 :] or [0.0]
    cc.threshold.fill_(float(np.mean(tail)))
    cc.eval()

    def recon(x_np: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            x = torch.as_tensor(x_np) * cc.scales_M[None, :, None]
            f = cc.encode(x)
            xhat = cc.decode(f) / cc.scales_M[None, :, None]
        return xhat.numpy(), f.numpy()

    xhat_tr, f_tr = recon(train)
    xhat_te, f_te = recon(test)
    norms_FM = cc.decoder_norms_FM().detach().double().numpy() / scales_M[None, :]
    fired_F = np.asarray((f_tr > 0).any(0))
    delta = None
    if M == 2:
        top = np.maximum(norms_FM.max(1), 1e-12)
        delta = 0.5 * ((norms_FM[:, 1] - norms_FM[:, 0]) / top + 1.0)
    return Crosscoder(
        module=cc,
        runs=runs,
        hook=hook,
        where=where,
        config=cfg,
        fve_train=dict(zip(runs, map(float, fve(train, xhat_tr)), strict=True)),
        fve_test=dict(zip(runs, map(float, fve(test, xhat_te)), strict=True)),
        l0_test=float((f_te > 0).sum(1).mean()),
        classes=classify(norms_FM, fired_F, runs),
        delta_norm=delta,
        decoder_norms_FM=norms_FM,
        fire_rate=(f_tr > 0).mean(0),
        test_prompts=test_prompts,
        history=history,
    )
