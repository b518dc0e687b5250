"""Model diffing: what fine-tuning (or an edit) changed, between runs of one model family.

- :func:`token_diff`: per-token KL and next-token log-prob change between two runs;
- :func:`adl`: the activation-difference lens, stored as steerable directions;
- :func:`match_features`: decoder-cosine, one-to-one matching of two SAEs' features;
- :func:`train_crosscoder` / :func:`store_crosscoder`: BatchTopK crosscoders over aligned runs,
  latents classified by relative decoder norm and stored as sparse features;
- :func:`trajectory`: behaviour rate, probe AUROC, direction cosine and CKA along a series;
- checkpoints made from weights (interpolations, task vectors) are built by the
  ingest job (:mod:`actstore.ingest.derived`), so they are runs like any other.

See ``docs/DIFFING.md``.

Example
-------
>>> from actstore.diffing import token_diff
>>> d = token_diff(st, "base/pairs", "backdoored/pairs")  # doctest: +SKIP
"""

from actstore.diffing.adl import ADLResult, adl
from actstore.diffing.crosscoder import Crosscoder, CrosscoderConfig, train_crosscoder
from actstore.diffing.crosscoder_store import exclusive_latents, store_crosscoder
from actstore.diffing.matching import FeatureMatch, match_features
from actstore.diffing.models import RunModel, load_checkpoint_model, run_model
from actstore.diffing.token_diff import TokenDiff, load_token_diff, token_diff
from actstore.diffing.trajectory import Trajectory, trajectory

__all__ = [
    "ADLResult",
    "Crosscoder",
    "CrosscoderConfig",
    "FeatureMatch",
    "RunModel",
    "TokenDiff",
    "Trajectory",
    "adl",
    "exclusive_latents",
    "load_checkpoint_model",
    "load_token_diff",
    "match_features",
    "run_model",
    "store_crosscoder",
    "token_diff",
    "train_crosscoder",
    "trajectory",
]
