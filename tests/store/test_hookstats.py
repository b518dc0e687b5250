"""Per-hook statistics (:mod:`actstore.store.hookstats`): recorded by the writer, mergeable.

References: numpy's mean, variance and norms of the rows as stored (read back
with ``Store.acts``), in float64.
"""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

import actstore
from actstore.cli import main
from actstore.store import hookstats, objects
from actstore.store.hookstats import HookStats

HOOKS = {"blocks.0.hook_resid_post": (0, 8), "blocks.1.hook_mlp_out": (1, 5)}


def _numpy_stats(x: np.ndarray) -> dict[str, object]:
    x = x.astype(np.float64)
    norms = np.linalg.norm(x, axis=1)
    return {
        "n": x.shape[0],
        "mean": x.mean(0),
        "var": x.var(0),
        "norm_mean": norms.mean(),
        "norm_max": norms.max(),
    }


def _check(s: HookStats, x: np.ndarray, rtol: float = 1e-12) -> None:
    ref = _numpy_stats(x)
    assert s.n == ref["n"]
    np.testing.assert_allclose(s.mean_D, ref["mean"], rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(s.var_D, ref["var"], rtol=rtol, atol=1e-12)
    assert s.mean_norm == pytest.approx(ref["norm_mean"], rel=rtol)
    assert s.norm_max == pytest.approx(ref["norm_max"], rel=rtol)


def test_merge_of_any_split_equals_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 6)) * 3 + 100  # a large mean: naive sums would cancel
    cuts = np.sort(rng.choice(np.arange(1, 1000), size=7, replace=False))
    parts = [HookStats.of(p) for p in np.split(x, cuts)]
    left = parts[0]
    for p in parts[1:]:
        left = left.merge(p)
    _check(left, x)
    tree = (
        parts[0]
        .merge(parts[1])
        .merge(parts[2].merge(parts[3]))
        .merge(parts[4].merge(parts[5].merge(parts[6].merge(parts[7]))))
    )
    np.testing.assert_allclose(tree.m2_D, left.m2_D, rtol=1e-12)
    assert HookStats.empty(6).merge(left) == left and left.merge(HookStats.empty(6)) == left


def _write(st: actstore.Store, name: str, dtype: str, rng: np.random.Generator) -> None:
    objects.create_run(st, name=name, hooks=HOOKS, store_dtype=dtype)
    with st.writer(name, commit_interval=0.0) as w:
        row = 0
        for b in range(5):
            n = int(rng.integers(1, 9))
            w.append(
                arrays={
                    h: rng.standard_normal((n, d)).astype(np.float32) * 2 + 1
                    for h, (_, d) in HOOKS.items()
                },
                tokens={"prompt_idx": np.full(n, b), "position": np.arange(n), "row": np.arange(n)},
                first_prompt=b,
                n_prompts=1,
            )
            row += n


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_writer_records_statistics_of_the_stored_rows(tmp_path, dtype):
    st = actstore.open(tmp_path / "s", create=True)
    _write(st, "r", dtype, np.random.default_rng(1))
    got = hookstats.read(st, "r")
    assert sorted(got) == sorted(HOOKS)
    for h in HOOKS:
        _check(got[h], st.acts("r", h).numpy(np.float64))
    info = st.info()["runs"][0]["hook_stats"]
    assert info["blocks.0.hook_resid_post"]["n"] == got["blocks.0.hook_resid_post"].n


def test_stats_command_fills_in_older_runs_with_the_ingest_numbers(tmp_path):
    st = actstore.open(tmp_path / "s", create=True)
    _write(st, "r", "float16", np.random.default_rng(2))
    _write(st, "q", "bfloat16", np.random.default_rng(3))
    recorded = {r: hookstats.read(st, r) for r in ("r", "q")}
    with st.catalog.write() as con:  # a store from before the statistics existed
        con.execute("DROP TABLE hook_stats")
    assert hookstats.read(st, "r") == {}
    r = CliRunner().invoke(main, ["stats", str(tmp_path / "s"), "--format", "csv"])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0] == '"run","hook","n","mean_norm","max_norm","mean_var"'
    assert len(r.output.splitlines()) == 1 + 2 * len(HOOKS)
    for run in ("r", "q"):
        again = hookstats.read(st, run)
        for h in HOOKS:
            assert again[h].n == recorded[run][h].n
            np.testing.assert_allclose(again[h].m2_D, recorded[run][h].m2_D, rtol=1e-12)
            np.testing.assert_allclose(again[h].mean_D, recorded[run][h].mean_D, rtol=1e-12)
    before = (tmp_path / "s" / "catalog.duckdb").read_bytes()
    hookstats.compute(st)  # idempotent: nothing to do, nothing written
    assert (tmp_path / "s" / "catalog.duckdb").read_bytes() == before
    out = CliRunner().invoke(main, ["info", str(tmp_path / "s")])
    assert "blocks.0.hook_resid_post: n=" in out.output and "mean|x|=" in out.output
