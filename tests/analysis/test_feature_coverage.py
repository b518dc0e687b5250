"""Analyses reading SAE features of rows they select, over an interrupted encode.

``reward_correlation`` and ``checkpoint_diff`` (with ``sae``) read the features of
their selected rows; an encode killed part-way (tests/helpers/coverage.py's SAE
``cut`` in ``b/pairs``) leaves rows without features, which are not zeros: both
are refused with the one-line message the queries give, naming the command that
finishes the encode, and the store stays byte-identical. Where the encode is
complete (``cut`` in ``a/pairs``) the answer is that of the SAE encoded at once.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import actstore
from actstore.analysis.diff import checkpoint_diff
from actstore.analysis.reward import reward_correlation
from actstore.errors import NotFoundError
from tests.helpers.coverage import CUT_ROWS, RUNS, snapshot
from tests.ingest.test_encode import HOOK

UNFINISHED = (
    rf"{{what}}: run 'b/pairs' has features of SAE 'cut' for {CUT_ROWS} of its \d+ rows "
    r"\(an encode is in progress or was interrupted\); finish it with "
    r"`actstore encode \S+ --sae cut --run b/pairs`"
)


@pytest.fixture
def store(coverage_store, tmp_path) -> actstore.Store:
    return actstore.open(shutil.copytree(coverage_store["store"], tmp_path / "store"))


def test_analyses_refuse_an_interrupted_encode_and_write_nothing(store):
    root = store.root
    before = snapshot(root)
    kw = {"reward": "reward", "split": None}
    with pytest.raises(NotFoundError, match=UNFINISHED.format(what="reward_correlation")):
        reward_correlation(store, run=RUNS[1], sae="cut", **kw)
    with pytest.raises(NotFoundError, match=UNFINISHED.format(what="checkpoint_diff")):
        checkpoint_diff(store, run_a=RUNS[0], run_b=RUNS[1], hooks=HOOK, sae="cut", split=None)
    assert snapshot(root) == before
    got = reward_correlation(store, run=RUNS[0], sae="cut", save=False, **kw).table
    want = reward_correlation(store, run=RUNS[0], sae="full", save=False, **kw).table
    assert got.num_rows == want.num_rows > 0 and got.column_names == want.column_names
    assert got.column("feature").to_pylist() == want.column("feature").to_pylist()
    for col in got.column_names:
        if got.schema.field(col).type in ("double", "float"):
            a, b = got.column(col).to_numpy(), want.column(col).to_numpy()
            np.testing.assert_allclose(a, b, rtol=1e-9, equal_nan=True)
