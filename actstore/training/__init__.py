"""Training SAEs on the store: sae_lens' own trainer fed by :meth:`actstore.Store.batches`.

- :func:`train_sae` (``actstore train-sae``): train, save with sae_lens, measure on
  held-out prompts, register in the catalog, optionally encode the runs;
- :func:`sae_metrics` and :func:`loss_recovered`: the metrics, for any sae_lens SAE.

Example
-------
>>> from actstore.training import TrainSAEConfig, train_sae
>>> res = train_sae(st, "backdoored/train", "blocks.2.hook_resid_post", "saes/topk",
...                 TrainSAEConfig(architecture="topk", k=8))  # doctest: +SKIP
"""

from actstore.training.metrics import loss_recovered, sae_metrics
from actstore.training.train import (
    METRICS_NAME,
    TrainResult,
    TrainSAEConfig,
    architectures,
    train_sae,
)

__all__ = [
    "METRICS_NAME",
    "TrainResult",
    "TrainSAEConfig",
    "architectures",
    "loss_recovered",
    "sae_metrics",
    "train_sae",
]
