"""A store whose SAE features were encoded after the ingest: all rows, a subset, interrupted.

The tiny Llama (``tests/helpers/tiny.py``) is ingested twice over one prompt set
(checkpoints ``a`` and ``b``, the same weights): runs ``a/pairs`` and ``b/pairs``,
``blocks.1.hook_resid_post`` in float32, no SAEs. One real sae_lens SAE (random
weights, 48 features, saved by sae_lens) is then encoded with
:func:`actstore.ingest.encode.encode` under three names:

* ``full``: every stored row of both runs;
* ``last3``: the rows ``pos_from_end >= -3`` only (``--positions``), in both runs;
* ``cut``: every row of ``a/pairs``; in ``b/pairs`` interrupted after its first
  part (:data:`CUT_ROWS` rows committed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import actstore
from actstore.ingest.encode import encode
from actstore.ingest.job import IngestJob
from actstore.ingest.runner import run_job
from tests.ingest.test_encode import HOOK, _save_sae
from tests.ingest.test_runner import job_dict

RUNS = ("a/pairs", "b/pairs")
LAST3 = "pos_from_end >= -3"
CUT_ROWS = 16


def build_coverage_store(root: Path, llama_dir: Path) -> dict[str, Path]:
    """Build the store under ``root``: ``{"store": its path, "sae": the SAE directory}``."""
    root.mkdir(parents=True, exist_ok=True)
    d = job_dict(root, llama_dir, hooks=[HOOK])
    d["checkpoints"] = [{"label": lab, "path": str(llama_dir)} for lab in ("a", "b")]
    run_job(IngestJob.from_dict(d), quiet=True)
    sae = _save_sae(root / "sae")
    st = actstore.open(d["store"])
    encode(st, str(sae), name="full", part_rows=8)
    encode(st, str(sae), name="last3", positions=LAST3, part_rows=8)
    encode(st, str(sae), name="cut", runs=[RUNS[0]], part_rows=CUT_ROWS)

    def die(row: int) -> None:
        if row >= CUT_ROWS:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        encode(st, str(sae), name="cut", runs=[RUNS[1]], part_rows=CUT_ROWS, _before_commit=die)
    st.close()
    return {"store": Path(d["store"]), "sae": sae}


def reference(st: actstore.Store, sae_dir: Path, run: str, rows: np.ndarray) -> np.ndarray:
    """sae_lens' own ``encode`` of the stored rows ``rows`` of ``run``: (N, 48) float32."""
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(sae_dir))
    x = st.acts(run, HOOK).numpy()[rows]
    with torch.no_grad():
        return sae.encode(torch.from_numpy(x.astype(np.float32))).numpy()


def stored_rows(st: actstore.Store, run: str, last3: bool) -> np.ndarray:
    """Sorted stored rows of ``run`` (those with ``pos_from_end >= -3`` if ``last3``), by numpy."""
    t = st.sql(
        'SELECT t."row", t.pos_from_end FROM tokens t JOIN runs r USING (run_id) '
        'WHERE r.name = ? AND t."row" IS NOT NULL',
        [run],
    ).df()
    keep = t["pos_from_end"].to_numpy() >= -3 if last3 else np.ones(len(t), bool)
    return np.sort(t["row"].to_numpy()[keep].astype(np.int64))


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file of a store, for byte-identity checks."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".write.lock"
    }
