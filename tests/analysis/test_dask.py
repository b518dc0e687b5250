"""PCA and contrast statistics on a Dask cluster equal the in-process analyses on the same rows."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest
from scipy.linalg import subspace_angles

import actstore
from actstore.analysis import contrast, load_direction
from actstore.analysis import dask as adask
from actstore.analysis import pca as local_pca
from actstore.errors import InputError, SpecError
from actstore.store import objects

pytest.importorskip("distributed")

H1, H2 = "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"


_ENV_BEFORE: dict[str, str] = {}


@pytest.fixture(scope="module")
def client():
    """Two single-threaded worker processes: the blocks really travel between processes."""
    _ENV_BEFORE.update(os.environ)
    with adask.local_client(n_workers=2, threads_per_worker=1) as c:
        yield c


def test_starting_the_cluster_leaves_this_processs_environment(client):
    # the nannies put their workers' variables (MALLOC_TRIM_THRESHOLD_, OMP_NUM_THREADS=1)
    # into the environment of the process that starts them; local_client takes them out
    assert client.run(lambda: os.environ.get("OMP_NUM_THREADS")) != {}

    def env(e):
        return {k: v for k, v in e.items() if k != "PYTEST_CURRENT_TEST"}

    assert env(os.environ) == env(_ENV_BEFORE)


def angle(a: np.ndarray, b: np.ndarray) -> float:
    return float(subspace_angles(a.T, b.T).max())


SCATTERED = "position_role = 'last' OR prompt_idx % 3 = 0"


@pytest.mark.parametrize(
    ("method", "where"), [("exact", None), ("exact", SCATTERED), ("randomized", SCATTERED)]
)
def test_dask_pca_equals_in_process_pca(synth, client, method, where):
    st = synth.store
    kw = dict(run="base", hooks=H2, where=where, k=3, method=method, save=False)
    ref = local_pca(st, **kw, block_rows=64)
    want = ref.fit()
    res = adask.pca(st, **kw, block_rows=48, client=client)
    got = res.fit()
    assert got.n == want.n and got.method == method
    assert angle(got.components, want.components) < 1e-6
    np.testing.assert_allclose(got.components, want.components, atol=1e-6)  # same signs too
    np.testing.assert_allclose(got.explained_variance, want.explained_variance, rtol=1e-8)
    np.testing.assert_allclose(
        got.explained_variance_ratio, want.explained_variance_ratio, rtol=1e-8
    )
    np.testing.assert_allclose(got.mean, want.mean, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(got.projections, want.projections, atol=1e-6)
    assert res.meta.column("row").to_pylist() == ref.meta.column("row").to_pylist()


def test_concat_uncentred_and_saved_like_the_in_process_pca(synth32, client):
    st = synth32.store
    kw = dict(run="base", hooks=[H1, H2], combine="concat", center=False, k=4)
    want = local_pca(st, **kw, save=False)
    got = adask.pca(st, **kw, name="dask_pca", client=client, block_rows=100)
    assert list(got.fits) == list(want.fits)
    assert angle(got.components, want.components) < 1e-6
    vec = load_direction(st, f"dask_pca/pc0/{H1}+{H2}")
    np.testing.assert_allclose(vec.vector, got.components[0])
    rec = st.sql("SELECT params FROM analyses WHERE name = 'dask_pca'").fetchall()[0][0]
    assert '"engine": "dask"' in rec


def test_default_scheduler_and_local_engine(synth32):
    st = synth32.store
    kw = dict(run="base", hooks=H1, k=2, save=False)
    threads = adask.pca(st, **kw, block_rows=50)  # no client: dask's threads
    local = adask.pca(st, **kw, engine="local")
    assert angle(threads.components, local.components) < 1e-6
    with pytest.raises(SpecError, match="engine must be 'dask' or 'local'"):
        adask.pca(st, **kw, engine="ray")


@pytest.mark.parametrize("engine", ["dask", "local"])
def test_contrast_stats_equal_contrast(synth, client, engine):
    st = synth.store
    kw = dict(run="base", hooks="blocks.*.hook_resid_post", group="triggered", split="split")
    kw["where"] = "position_role = 'last'"
    ref = contrast(st, **kw, methods=["mean_diff"], n_random=10, save=False)
    res = adask.contrast_stats(
        st, **kw, engine=engine, client=client if engine == "dask" else None, save=False
    )
    X_all = {h: st.acts("base", h, where=kw["where"]) for h in (H1, H2)}
    for r, e in zip(ref.layers, res.layers, strict=True):
        assert r.hook == e.hook and r.n_train == e.n_train
        np.testing.assert_allclose(e.mean_diff, r.directions["mean_diff"], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(e.variance_ratio, r.variance_ratio, rtol=1e-9)
        if e.hook in X_all:
            a = X_all[e.hook]
            X, y = a.numpy(np.float64), np.asarray(a.meta.column("triggered").to_pylist())
            np.testing.assert_allclose(e.mean_pos, X[y].mean(0), rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(e.mean_neg, X[~y].mean(0), rtol=1e-10, atol=1e-12)
            assert e.n == (int(y.sum()), int((~y).sum()))
    assert res.summary().num_rows == 3


def test_contrast_stats_saves_directions(synth32, client):
    st = synth32.store
    res = adask.contrast_stats(
        st, run="base", hooks=H2, positive="triggered", negative="NOT triggered",
        where="position_role = 'last'", split="none", name="cs", client=client,
    )  # fmt: skip
    d = load_direction(st, f"cs/mean_diff/{H2}")
    np.testing.assert_allclose(d.vector, res.layer().mean_diff)
    assert d.method == "mean_diff" and res.analysis_id is not None
    with pytest.raises(InputError, match="already exist"):
        adask.contrast_stats(st, run="base", hooks=H2, group="triggered", name="cs", client=client)
    with pytest.raises(InputError, match="only positive rows"):
        adask.contrast_stats(
            st, run="base", hooks=H2, group="triggered", where="triggered", save=False
        )


def test_to_dask_reads_bfloat16_and_selected_rows(tmp_path, client):
    st = actstore.open(tmp_path / "s", create=True)
    ps = objects.add_prompt_set(
        st, name="p", table=pa.table({"text": [f"t{i}" for i in range(50)]})
    )
    hooks = {H1: (1, 24)}
    rid = objects.create_run(st, name="r", prompt_set_id=ps, hooks=hooks, store_dtype="bfloat16")
    x = np.random.default_rng(0).standard_normal((200, 24)).astype(np.float32)
    with st.writer(rid) as w:
        w.append(
            arrays={H1: x},
            tokens={
                "prompt_idx": np.repeat(np.arange(50), 4),
                "position": np.tile(np.arange(4), 50),
                "row": np.arange(200),
            },
            first_prompt=0,
            n_prompts=50,
        )
    X, sel = adask.to_dask(st, run="r", hooks=H1, where="position % 2 = 1", block_rows=32)
    assert X.shape == (100, 24) and X.dtype == np.float64
    got = X.compute(scheduler=client)
    np.testing.assert_array_equal(got, st.acts("r", H1, where="position % 2 = 1").numpy(np.float64))
    np.testing.assert_array_equal(sel.rows, np.arange(1, 200, 2))
