"""Train a sae_lens SAE on stored activations, with sae_lens' own trainer, and register it.

:func:`train_sae` selects the rows of one hook in one or several runs (several
checkpoints of one family make one training set), holds out a share of the
*prompts* (all their tokens: consecutive tokens are correlated, so holding out
rows would leak), and feeds the rest to ``sae_lens.SAETrainer`` through
:meth:`actstore.Store.batches` (block shuffle plus a shuffle buffer, endless).
The SAE is one of sae_lens' own training classes (``standard``, ``topk``,
``batchtopk``, ``jumprelu``, ``matryoshka_batchtopk``, ...), built from its own
config class.

Activations are scaled by one factor while training (``normalize``):
``centered`` (default) makes the mean squared distance from the mean ``D`` (from
the runs' recorded per-hook statistics, :mod:`actstore.store.hookstats`, when
there are some and no ``where``), so
one sparsity coefficient suits any layer (in a small residual stream the mean
dominates ``|x|``); ``expected_average_only_in`` is sae_lens' own estimate
(``E|x|^2 = D``); ``none`` trains on raw rows. sae_lens folds the factor into the
weights at the end, so the saved SAE takes raw activations.

The SAE is saved with ``save_inference_model`` (``SAE.load_from_disk`` loads it),
then reloaded, and its metrics (:mod:`actstore.training.metrics`) are measured on
the held-out rows with its own ``encode``/``decode``; with the run's checkpoint
loadable, also the loss with the SAE spliced in. It is registered in the catalog
(``saes``) with its training parameters, data and metrics under
``config["actstore_training"]``; ``encode=True`` then encodes the training runs.

Example
-------
>>> res = train_sae(st, ["backdoored/train"], "blocks.2.hook_resid_post", "saes/topk",
...                 TrainSAEConfig(architecture="topk", d_sae=256, k=8))  # doctest: +SKIP
>>> res.metrics["fve"] > 0.9  # doctest: +SKIP
True
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from actstore.errors import InputError, SpecError
from actstore.training.metrics import DENSE_THRESHOLD, loss_recovered, sae_metrics

if TYPE_CHECKING:
    from actstore.store.store import Store

__all__ = ["METRICS_NAME", "TrainResult", "TrainSAEConfig", "architectures", "train_sae"]

METRICS_NAME = "training_metrics.json"
"""Sidecar file in the SAE directory: the parameters, data and held-out metrics."""
NORMALIZE = ("centered", "expected_average_only_in", "none")
_ALIASES = {"matryoshka": "matryoshka_batchtopk"}
_K_ARCHS = ("topk", "abstopk", "batchtopk", "matryoshka_batchtopk")


def architectures() -> list[str]:
    """The architectures sae_lens can train (its training-class registry).

    Example
    -------
    >>> "topk" in architectures() and "standard" in architectures()
    True
    """
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    return sorted(SAE_TRAINING_CLASS_REGISTRY)


@dataclass(frozen=True, slots=True)
class TrainSAEConfig:
    """How :func:`train_sae` trains; unknown keys in :meth:`from_dict` are errors.

    Example
    -------
    >>> TrainSAEConfig(architecture="topk", k=8).steps
    2000
    """

    architecture: str = "standard"
    """A sae_lens training architecture (see :func:`architectures`); ``matryoshka`` is
    ``matryoshka_batchtopk``."""
    d_sae: int = 256
    """Number of features ``F``."""
    k: int | None = None
    """Active features per row (top-k architectures; default 16 there)."""
    l1_coefficient: float | None = None
    """L1 penalty (``standard``, ``gated``; default 3.0 on scaled activations)."""
    l0_coefficient: float | None = None
    """L0 penalty (``jumprelu``; sae_lens' default if None)."""
    sparsity_warm_up_steps: int = 100
    """Steps over which the L1/L0 coefficient ramps up from 0."""
    steps: int = 2000
    """Optimizer steps."""
    batch_size: int = 256
    """Rows per step."""
    lr: float = 1e-2
    """Adam learning rate; constant, then linear decay to 0 over the last ``lr_decay`` share."""
    lr_decay: float = 0.2
    """Share of the steps over which the learning rate decays to zero."""
    normalize: str = "centered"
    """``centered``, ``expected_average_only_in`` (sae_lens) or ``none``: see the module."""
    holdout: float = 0.1
    """Share of the prompts (of each run) held out for the metrics."""
    seed: int = 0
    """Seeds the weights, the held-out prompts and the batch order."""
    loss_prompts: int = 32
    """Held-out prompts per run for the spliced-in loss (0: skip it)."""
    dense_threshold: float = DENSE_THRESHOLD
    """Firing frequency above which a feature counts as dense."""
    sae_params: Mapping[str, Any] = field(default_factory=dict)
    """Other fields of the sae_lens training config (e.g. ``aux_loss_coefficient``)."""

    def __post_init__(self) -> None:
        arch = _ALIASES.get(self.architecture, self.architecture)
        object.__setattr__(self, "architecture", arch)
        valid = architectures()
        if arch not in valid:
            raise SpecError(
                f"architecture {self.architecture!r} is not one sae_lens can train; "
                f"valid: {', '.join(valid)}"
            )
        for name in ("d_sae", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise SpecError(
                    f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}"
                )
        if self.k is not None and not 1 <= self.k <= self.d_sae:
            raise SpecError(f"k must be between 1 and d-sae ({self.d_sae}), got {self.k}")
        if self.k is not None and arch not in _K_ARCHS:
            raise SpecError(f"k applies to {', '.join(_K_ARCHS)}, not {arch!r}; use --l1 or --l0")
        if self.l1_coefficient is not None and arch not in ("standard", "gated"):
            raise SpecError(f"l1 applies to standard and gated SAEs, not {arch!r}")
        if self.l0_coefficient is not None and arch != "jumprelu":
            raise SpecError(f"l0 applies to jumprelu SAEs, not {arch!r}")
        if self.normalize not in NORMALIZE:
            raise SpecError(f"normalize {self.normalize!r} is not one of {', '.join(NORMALIZE)}")
        if not 0 < self.holdout < 1:
            raise SpecError(f"holdout must be a share between 0 and 1, got {self.holdout}")
        if self.lr <= 0 or not 0 <= self.lr_decay <= 1 or self.sparsity_warm_up_steps < 0:
            raise SpecError(
                "lr must be > 0, lr_decay in [0, 1] and sparsity_warm_up_steps >= 0; got "
                f"{self.lr}, {self.lr_decay}, {self.sparsity_warm_up_steps}"
            )
        object.__setattr__(self, "sae_params", dict(self.sae_params))

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready.

        Example
        -------
        >>> TrainSAEConfig().to_dict()["d_sae"]
        256
        """
        d = asdict(self)
        d["sae_params"] = dict(self.sae_params)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainSAEConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error.

        Example
        -------
        >>> TrainSAEConfig.from_dict({"architecture": "topk", "k": 4}).k
        4
        """
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise SpecError(f"unknown train-sae setting(s) {unknown}; valid: {', '.join(known)}")
        return cls(**d)

    def sae_config(self, d_in: int, hook: str, model_name: str | None) -> Any:
        """The sae_lens training config of the SAE.

        Example
        -------
        >>> TrainSAEConfig(architecture="topk", k=4).sae_config(16, "blocks.0.hook_resid_post", None).k
        4
        """
        from sae_lens.registry import get_sae_training_class
        from sae_lens.saes.sae import SAEMetadata

        _, cfg_cls = get_sae_training_class(self.architecture)
        names = {f.name for f in fields(cfg_cls)}
        kw: dict[str, Any] = {
            "d_in": d_in,
            "d_sae": self.d_sae,
            "normalize_activations": "none"
            if self.normalize == "none"
            else "expected_average_only_in",
            "metadata": SAEMetadata(hook_name=hook, model_name=model_name),
        }
        if "k" in names:
            kw["k"] = self.k or min(16, self.d_sae)
        if "l1_coefficient" in names:
            kw["l1_coefficient"] = 3.0 if self.l1_coefficient is None else self.l1_coefficient
            kw["l1_warm_up_steps"] = self.sparsity_warm_up_steps
        if "l0_coefficient" in names:
            if self.l0_coefficient is not None:
                kw["l0_coefficient"] = self.l0_coefficient
            kw["l0_warm_up_steps"] = self.sparsity_warm_up_steps
        if "matryoshka_widths" in names and "matryoshka_widths" not in self.sae_params:
            kw["matryoshka_widths"] = sorted(
                {max(1, self.d_sae // 4), max(1, self.d_sae // 2), self.d_sae}
            )
        bad = sorted(set(self.sae_params) - names - {"d_in", "d_sae", "metadata"})
        if bad:
            raise SpecError(
                f"{self.architecture} SAEs have no setting(s) {bad}; its sae_lens settings: "
                f"{', '.join(sorted(names - {'metadata'}))}"
            )
        kw.update(self.sae_params)
        try:
            return cfg_cls(**kw)
        except (ValueError, TypeError) as e:
            raise SpecError(f"{self.architecture} SAE settings rejected by sae_lens: {e}") from None


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What :func:`train_sae` made.

    Example
    -------
    >>> res.path, res.metrics["fve"]  # doctest: +SKIP
    (PosixPath('saes/topk'), 0.95)
    """

    name: str
    """The SAE's name in the catalog."""
    sae_id: int
    """Its ``sae_id``."""
    path: Path
    """The directory sae_lens saved it to."""
    metrics: dict[str, Any]
    """Held-out metrics (see :func:`actstore.training.metrics.sae_metrics`), and ``loss``
    per run when its checkpoint loaded."""
    record: dict[str, Any]
    """Everything recorded in ``config["actstore_training"]``."""
    encoded: list[Any]
    """:class:`~actstore.ingest.encode.EncodeResult` per run when ``encode`` was asked."""


def _split(
    store: Store, runs: Sequence[str | int], hook: str, where: str | None, cfg: TrainSAEConfig
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, list[int]], dict[str, int]]:
    """Train rows, held-out rows and held-out prompts per run name; run ids."""
    train: dict[str, np.ndarray] = {}
    held: dict[str, np.ndarray] = {}
    held_prompts: dict[str, list[int]] = {}
    ids: dict[str, int] = {}
    rng = np.random.default_rng([cfg.seed, 7])
    for run in runs:
        info = store.array_info(run, hook)
        rid = int(info["run_id"])
        name = str(store.sql("SELECT name FROM runs WHERE run_id = ?", [rid]).fetchall()[0][0])
        if name in ids:
            continue
        rows, meta = store._select_rows(rid, int(info["n_rows"]), where, None)
        if rows.size == 0:
            raise InputError(
                f"where={where!r} selects no rows of hook {hook!r} in run {name!r}; loosen it "
                'or check the labels with `actstore sql STORE "SELECT * FROM labeled_tokens"`'
                if where
                else f"run {name!r} has no committed rows of hook {hook!r}"
            )
        prompt_N = meta.column("prompt_idx").to_numpy().astype(np.int64)
        prompts = np.unique(prompt_N)
        if prompts.size < 2:
            raise InputError(
                f"run {name!r}: the selected rows come from {prompts.size} prompt; holding out "
                "prompts needs at least 2"
            )
        n_held = min(prompts.size - 1, max(1, round(cfg.holdout * prompts.size)))
        out = np.sort(rng.choice(prompts, size=n_held, replace=False))
        is_held = np.isin(prompt_N, out)
        train[name], held[name] = rows[~is_held], rows[is_held]
        held_prompts[name] = [int(p) for p in out]
        ids[name] = rid
    return train, held, held_prompts, ids


def _centered_scale(
    store: Store, runs: list[str], hook: str, rows: dict[str, np.ndarray], *, use_stats: bool
) -> tuple[float, str]:
    """``sqrt(D / E|x - mean|^2)``, and where it came from.

    From the runs' recorded per-hook statistics when every run has them and no
    ``where`` narrows the rows (all rows, held-out ones included: one scalar, no
    pass over the data); otherwise from one float64 pass over the training rows.
    """
    from actstore.store import hookstats

    if use_stats:
        per_run = [hookstats.read(store, r).get(hook) for r in runs]
        if all(s is not None and s.n for s in per_run):
            total = hookstats.merged([{hook: s} for s in per_run if s is not None])[hook]
            d = int(total.mean_D.shape[0])
            return math.sqrt(d / max(float(total.var_D.sum()), 1e-12)), "hook_stats"
    n, s1, s2 = 0, None, 0.0
    for x in store.batches(runs, hook, 65536, shuffle=False, rows=rows):
        x = x.double()
        n += x.shape[0]
        s1 = x.sum(0) if s1 is None else s1 + x.sum(0)
        s2 += float((x * x).sum())
    assert s1 is not None
    mean = s1 / n
    centered_sq = s2 / n - float((mean * mean).sum())
    d = int(mean.shape[0])
    return math.sqrt(d / max(centered_sq, 1e-12)), "training rows"


def _loss_for_run(
    store: Store, rid: int, sae: Any, hook: str, prompts: list[int], device: str
) -> dict[str, float] | None:
    """The spliced-in loss on a run's held-out prompts, or None if its checkpoint will not load."""
    from actstore.ingest.models import load_checkpoint

    rec = store.sql(
        """SELECT c.path, c.revision, c.label, c.weights_hash, r.provenance
           FROM runs r JOIN checkpoints c USING (checkpoint_id) WHERE r.run_id = ?""",
        [rid],
    ).fetchall()
    if not rec or not rec[0][0] or not Path(str(rec[0][0])).exists():
        return None
    path, revision, label, whash, prov = rec[0]
    model_prov = json.loads(prov or "{}").get("model", {})
    try:
        ck = load_checkpoint(
            str(path),
            label=str(label),
            revision=str(revision or ""),
            dtype=model_prov.get("dtype") or "float32",
            device=device,
        )
    except InputError:
        return None
    if whash and ck.weights_hash != whash:
        return None
    toks = store.sql(
        """SELECT list(token_id ORDER BY position) FROM tokens
           WHERE run_id = ? AND NOT coalesce(is_completion, false) AND list_contains(?, prompt_idx)
           GROUP BY prompt_idx ORDER BY prompt_idx""",
        [rid, prompts],
    ).fetchall()
    ids = [[int(t) for t in r[0]] for r in toks if r[0] and None not in r[0]]
    if not ids:
        return None
    return loss_recovered(ck.model, sae, hook, ids, device=device)


@contextlib.contextmanager
def _quiet(on: bool) -> Iterator[None]:
    """Silence sae_lens' progress bar (its trainer has no switch for it)."""
    from sae_lens.training import sae_trainer

    real = sae_trainer.tqdm
    if on:
        sae_trainer.tqdm = functools.partial(real, disable=True)
    try:
        yield
    finally:
        sae_trainer.tqdm = real


def train_sae(
    store: Store,
    runs: Sequence[str | int] | str | int,
    hook: str,
    out_dir: str | Path,
    config: TrainSAEConfig | None = None,
    *,
    where: str | None = None,
    name: str | None = None,
    device: str = "cpu",
    encode: bool = False,
    quiet: bool = True,
) -> TrainResult:
    """Train an SAE on the stored rows of ``hook`` in ``runs``, save it and register it.

    Parameters
    ----------
    store
        A store opened for writing.
    runs
        The training runs (one training set); every one must store ``hook``.
    hook
        The hook (e.g. ``"blocks.2.hook_resid_post"``).
    out_dir
        Where sae_lens saves it (must not hold an SAE already).
    config
        How to train (:class:`TrainSAEConfig` defaults if None).
    where
        A SQL predicate over ``labeled_tokens`` choosing the rows.
    name
        Its name in the catalog (default: the directory's name).
    device
        Where it trains (``cpu``, ``cuda``).
    encode
        Then encode the training runs with it (:func:`actstore.ingest.encode.encode`).
    quiet
        No progress bar.

    Returns
    -------
    TrainResult

    Raises
    ------
    InputError
        Before anything is written: an unknown run or hook, a ``where`` selecting no
        rows, runs of different widths, ``out_dir`` holding an SAE, a name taken.

    Example
    -------
    >>> train_sae(st, "backdoored/train", "blocks.2.hook_resid_post", "saes/std").metrics["l0"]  # doctest: +SKIP
    12.5
    """
    from sae_lens import SAETrainer
    from sae_lens.config import SAETrainerConfig
    from sae_lens.registry import get_sae_training_class

    from actstore.ingest.saes import SAESpec, load_sae
    from actstore.store import objects

    store._check_writable()
    cfg = config or TrainSAEConfig()
    run_list = [runs] if isinstance(runs, str | int) else list(runs)
    if not run_list:
        raise InputError("train-sae needs at least one --run")
    out = Path(out_dir)
    if (out / "cfg.json").exists():
        raise InputError(f"{str(out)!r} already holds an SAE; choose another -o directory")
    if out.exists() and not out.is_dir():
        raise InputError(f"{str(out)!r} is a file; -o needs a directory")
    sae_name = name or out.resolve().name
    taken = store.sql("SELECT count(*) FROM saes WHERE name = ?", [sae_name]).fetchall()[0][0]
    if taken:
        raise InputError(f"SAE {sae_name!r} is already in the store; give this one another --name")
    train_rows, held_rows, held_prompts, run_ids = _split(store, run_list, hook, where, cfg)
    names = list(train_rows)
    d_in = int(store.array_info(names[0], hook)["d"])
    widths = {n: int(store.array_info(n, hook)["d"]) for n in names}
    if len(set(widths.values())) > 1:
        raise InputError(f"runs store hook {hook!r} with different widths {widths}")
    model_name = store.sql(
        "SELECT m.name FROM runs r JOIN checkpoints c USING (checkpoint_id) "
        "JOIN models m USING (model_id) WHERE r.run_id = ?",
        [run_ids[names[0]]],
    ).fetchall()
    sae_cfg = cfg.sae_config(d_in, hook, str(model_name[0][0]) if model_name else None)

    torch.manual_seed(cfg.seed)
    train_cls, _ = get_sae_training_class(cfg.architecture)
    sae = train_cls(sae_cfg)
    scale, scale_from = None, None
    if cfg.normalize == "centered":
        scale, scale_from = _centered_scale(store, names, hook, train_rows, use_stats=where is None)
    stream = store.batches(
        names, hook, cfg.batch_size, rows=train_rows, seed=cfg.seed, epochs=None, drop_last=True
    )
    if scale is not None and hasattr(sae, "b_dec"):
        with torch.no_grad():  # start the decoder bias at the (scaled) mean
            first = torch.cat([next(stream) for _ in range(4)])
            sae.b_dec.copy_(first.mean(0) * scale)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg.steps * cfg.batch_size,
        train_batch_size_samples=cfg.batch_size,
        lr=cfg.lr,
        lr_end=cfg.lr / 10,  # only used by cosine schedules; sae_lens' default
        lr_decay_steps=int(cfg.lr_decay * cfg.steps),
        device=device,
        n_batches_for_norm_estimate=min(100, cfg.steps),
    )
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=stream)
    if scale is not None:
        trainer.activation_scaler.scaling_factor = scale  # sae_lens folds it in after fit
    with _quiet(quiet):
        trained = trainer.fit()
    trained.eval()
    if cfg.architecture in ("standard", "gated"):
        trained.fold_W_dec_norm()  # unit decoder rows; features in residual-stream units
    out.mkdir(parents=True, exist_ok=True)
    trained.save_inference_model(str(out))

    loaded = load_sae(SAESpec(path=str(out), name=sae_name), device)
    held_x = torch.cat(list(store.batches(names, hook, 65536, shuffle=False, rows=held_rows)))
    metrics: dict[str, Any] = sae_metrics(loaded.sae, held_x, dense_threshold=cfg.dense_threshold)
    if cfg.loss_prompts > 0:
        losses = {}
        for n in names:
            got = _loss_for_run(
                store, run_ids[n], loaded.sae, hook, held_prompts[n][: cfg.loss_prompts], device
            )
            if got is not None:
                losses[n] = got
        if losses:
            metrics["loss"] = losses
    record = {
        "params": cfg.to_dict(),
        "trainer": "sae_lens.SAETrainer",
        "scaling_factor": scale,
        "scaling_from": scale_from,
        "data": {
            "runs": names,
            "hook": hook,
            "where": where,
            "train_rows": {n: int(r.size) for n, r in train_rows.items()},
            "heldout_rows": {n: int(r.size) for n, r in held_rows.items()},
            "heldout_prompts": held_prompts,
        },
        "metrics": metrics,
    }
    (out / METRICS_NAME).write_text(json.dumps(record, indent=2) + "\n")
    rec = loaded.catalog_record()
    rec["config"] = {**rec["config"], "actstore_training": record}
    sae_id = objects.add_sae(store, **rec)
    encoded: list[Any] = []
    if encode:
        from actstore.ingest.encode import encode as encode_runs

        encoded = encode_runs(store, loaded, names, device=device)
    return TrainResult(sae_name, sae_id, out, metrics, record, encoded)
