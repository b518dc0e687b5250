"""CLI start-up: how long light commands take, and what they import.

Runs, in fresh processes, interleaved round by round so that every contender sees the
same machine load: ``actstore sql STORE "SELECT 1"``, ``actstore info STORE`` and
``python -c "import actstore"`` for the working tree and, with ``--baseline DIR`` (a
checkout of an older commit, e.g. ``git archive COMMIT | tar -x -C DIR``), for that tree;
plus the floors ``python -c pass`` and ``python -c "import duckdb, pyarrow, numpy, click"``
(what ``sql`` cannot avoid) and ``python -c "import torch"`` for scale. Reports the
median wall time and the median CPU time (user + system, of the child: steadier than
wall time on a shared machine), and the modules each command imports
(``python -X importtime``).

Usage: ``python benchmarks/bench_startup.py [--baseline DIR] [--runs 7]``.
Writes ``benchmarks/results/startup.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HEAVY = ("torch", "transformers", "scipy", "zarr", "fsspec", "ml_dtypes", "numcodecs")


def make_store(path: Path) -> None:
    """A store with one run of rows, made by the working tree's library."""
    code = (
        "import sys, numpy as np, pyarrow as pa, actstore\n"
        "from actstore.store import objects\n"
        "st = actstore.open(sys.argv[1], create=True)\n"
        "ps = objects.add_prompt_set(st, name='p', table=pa.table({'text': ['a', 'b']}))\n"
        "rid = objects.create_run(st, name='r', prompt_set_id=ps, hooks={'h': (0, 4)})\n"
        "with st.writer(rid) as w:\n"
        "    w.append(arrays={'h': np.ones((2, 4), np.float32)}, first_prompt=0, n_prompts=2,\n"
        "             tokens={'prompt_idx': [0, 1], 'position': [0, 0], 'row': [0, 1]})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, env=env)


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU seconds of one run of ``argv`` (in the directory of its tree: ``-m``
    puts the working directory first on the path)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL, cwd=env["PYTHONPATH"])
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def imports(argv: list[str], env: dict[str, str]) -> tuple[int, list[str]]:
    """How many modules ``argv`` imports, and which of :data:`HEAVY`."""
    out = subprocess.run(
        [argv[0], "-X", "importtime", *argv[1:]],
        check=True,
        env=env,
        cwd=env["PYTHONPATH"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ).stderr
    names = [line.rsplit("|", 1)[-1].strip() for line in out.splitlines() if "|" in line]
    names = [n for n in names if n and n != "imported package"]
    return len(names), sorted({n for n in names if n.split(".")[0] in HEAVY and "." not in n})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", type=Path, default=None, help="an older checkout to compare")
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        make_store(store)
        trees = {"now": ROOT} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
        cases: list[tuple[str, list[str], Path]] = [
            ("python -c pass", [py, "-c", "pass"], ROOT),
            (
                "import duckdb, pyarrow, numpy, click",
                [py, "-c", "import duckdb, pyarrow, numpy, click"],
                ROOT,
            ),
            ("import torch", [py, "-c", "import torch"], ROOT),
        ]
        for label, tree in trees.items():
            cases += [
                (
                    f"{label}: actstore sql STORE 'SELECT 1'",
                    [py, "-m", "actstore.cli", "sql", str(store), "SELECT 1"],
                    tree,
                ),
                (
                    f"{label}: actstore info STORE",
                    [py, "-m", "actstore.cli", "info", str(store)],
                    tree,
                ),
                (f"{label}: import actstore", [py, "-c", "import actstore"], tree),
            ]
        env_of = {t: {**os.environ, "PYTHONPATH": str(t)} for t in {c[2] for c in cases}}
        for _, argv, tree in cases:  # warm the page cache
            timed(argv, env_of[tree])
        samples: dict[str, list[tuple[float, float]]] = {c[0]: [] for c in cases}
        for _ in range(args.runs):
            for name, argv, tree in cases:
                samples[name].append(timed(argv, env_of[tree]))
        res: dict[str, dict] = {}
        for name, argv, tree in cases:
            n_mod, heavy = imports(argv, env_of[tree])
            res[name] = {
                "wall_s": statistics.median(w for w, _ in samples[name]),
                "cpu_s": statistics.median(c for _, c in samples[name]),
                "modules": n_mod,
                "heavy": heavy,
            }
    if args.baseline:
        for cmd in ("actstore sql STORE 'SELECT 1'", "actstore info STORE", "import actstore"):
            a, b = res[f"now: {cmd}"], res[f"baseline: {cmd}"]
            res[f"ratio now/baseline: {cmd}"] = {
                "wall": a["wall_s"] / b["wall_s"],
                "cpu": a["cpu_s"] / b["cpu_s"],
            }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "startup.json").write_text(json.dumps({"runs": args.runs, **res}, indent=2))
    print("| command | wall (median) | CPU (median) | modules | heavy imports |")
    print("|---|---:|---:|---:|---|")
    for name, r in res.items():
        if "wall_s" in r:
            heavy = ", ".join(r["heavy"]) or "none"
            print(
                f"| {name} | {r['wall_s']:.2f} s | {r['cpu_s']:.2f} s | {r['modules']} | {heavy} |"
            )
        else:
            print(f"| {name} | {r['wall']:.2f}x | {r['cpu']:.2f}x | | |")


if __name__ == "__main__":
    main()
