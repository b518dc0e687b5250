"""Storing a crosscoder: its weights, its latents as sparse features, its latent classes.

:func:`store_crosscoder` saves a trained :class:`~actstore.diffing.crosscoder.Crosscoder`
in the store (``crosscoders/{name}/weights.safetensors`` and ``cfg.json``; the
weights' sha256 in ``saes.weights_hash``), registers it in ``saes`` (architecture
``batchtopk_crosscoder``), stores its latents' activations on every chosen row as
sparse features under each of its runs (identical values), so the named queries work
with ``sae = name`` from any of them, and writes each latent's class, relative norm,
decoder norms and firing rate to ``crosscoder_latents``. Files are written first and
become visible in one catalog transaction. :func:`exclusive_latents` reports the
latents exclusive to one run and how they fire by group.

Example
-------
>>> sid = store_crosscoder(st, cc, name="cc_l2")  # doctest: +SKIP
>>> exclusive_latents(st, "cc_l2", "backdoored/pairs").df()  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from actstore.diffing.crosscoder import (
    ARCHITECTURE,
    BatchTopKCrosscoder,
    Crosscoder,
    aligned_rows,
)
from actstore.errors import InputError

if TYPE_CHECKING:
    from actstore.store.store import Store

TABLE_DDL = """CREATE TABLE IF NOT EXISTS crosscoder_latents (
    sae_id INTEGER, feature INTEGER, class VARCHAR, delta_norm DOUBLE,
    decoder_norms DOUBLE[], fire_rate DOUBLE)"""
"""Per latent of a stored crosscoder: class, relative norm, decoder norm per run, firing rate."""


def _weights_bytes(cc: Crosscoder) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().contiguous() for k, v in cc.module.state_dict().items()})


def store_crosscoder(store: Store, cc: Crosscoder, *, name: str, batch_rows: int = 4096) -> int:
    """Save a crosscoder in the store, register it as an SAE, store its latents as features.

    The latents of every aligned row (the rows ``cc.where`` chose) are stored under
    each of the crosscoder's runs. Returns its ``sae_id``.

    Example
    -------
    >>> sid = store_crosscoder(st, cc, name="cc_l2")  # doctest: +SKIP
    >>> run_named(st, "trigger_diff", run="backdoored/pairs", sae="cc_l2", group_a="triggered")  # doctest: +SKIP
    """
    from actstore.store import features as _features
    from actstore.store.writer import bump_commit_seq

    taken = store.sql("SELECT 1 FROM saes WHERE name = ?", [name]).fetchall()
    if taken:
        raise InputError(f"an SAE named {name!r} is already in the store; choose another name")
    # every aligned row, not only the training selection: stored features cover whole runs
    x_NMD, _, rows = aligned_rows(store, cc.runs, cc.hook, None)
    f_NF = cc.encode(x_NMD, batch_rows)
    nz_N, nz_F = np.nonzero(f_NF)
    vals = f_NF[nz_N, nz_F]
    blob = _weights_bytes(cc)
    digest = hashlib.sha256(blob).hexdigest()[:32]
    rel_dir = f"crosscoders/{name}"
    cfg = {
        "architecture": ARCHITECTURE,
        "runs": cc.runs,
        "hook": cc.hook,
        "where": cc.where,
        "d_in": int(x_NMD.shape[2]),
        "d_sae": cc.config.d_dict,
        "threshold": float(cc.module.threshold.item()),
        "scales": cc.module.scales_M.tolist(),
        "train": asdict(cc.config),
        "fve_train": cc.fve_train,
        "fve_test": cc.fve_test,
        "l0_test": cc.l0_test,
        "test_prompts": cc.test_prompts,
    }
    store.location.write_bytes(f"{rel_dir}/weights.safetensors", blob)
    store.location.write_bytes(f"{rel_dir}/cfg.json", json.dumps(cfg, indent=1).encode())
    layer_rows = store.sql(
        "SELECT layer FROM arrays WHERE run_id = ? AND hook = ?",
        [store.run_id(cc.runs[0]), cc.hook],
    ).fetchall()
    layer = layer_rows[0][0] if layer_rows else None
    latents = pa.table(
        {
            "feature": pa.array(np.arange(cc.config.d_dict), pa.int32()),
            "class": pa.array(cc.classes, pa.string()),
            "delta_norm": pa.array(
                cc.delta_norm if cc.delta_norm is not None else np.full(cc.config.d_dict, np.nan),
                pa.float64(),
                from_pandas=True,
            ),
            "decoder_norms": pa.array([list(map(float, r)) for r in cc.decoder_norms_FM]),
            "fire_rate": pa.array(cc.fire_rate.astype(np.float64)),
        }
    )
    # files first (invisible until the catalog lists them), then one transaction
    sid = int(store.sql("SELECT coalesce(max(sae_id), 0) + 1 FROM saes").fetchall()[0][0])
    parts = []
    for run, run_rows in zip(cc.runs, rows, strict=True):
        rid = store.run_id(run)
        rel, n_bytes, crc = _features.write_part(
            store.location,
            run_id=rid,
            sae_id=sid,
            first_row=int(run_rows.min()),
            rows=run_rows[nz_N],
            features=nz_F,
            values=vals,
        )
        span = int(run_rows.max() - run_rows.min() + 1)
        parts.append([rid, sid, rel, int(run_rows.min()), span, int(vals.size), n_bytes, crc])
    with store.catalog.write() as con:
        if con.execute("SELECT 1 FROM saes WHERE sae_id = ? OR name = ?", [sid, name]).fetchall():
            raise InputError(f"another writer added an SAE while {name!r} was stored; run again")
        con.execute(
            "INSERT INTO saes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
            [
                sid,
                name,
                rel_dir,
                cc.hook,
                layer,
                cfg["d_in"],
                cfg["d_sae"],
                ARCHITECTURE,
                digest,
                json.dumps(cfg),
            ],
        )
        con.execute(TABLE_DDL)
        con.register("_latents", latents)
        con.execute(
            "INSERT INTO crosscoder_latents SELECT ?, feature, class, delta_norm, decoder_norms, "
            "fire_rate FROM _latents",
            [sid],
        )
        con.unregister("_latents")
        _features.record_parts(con, parts)
        bump_commit_seq(con)
    return sid


def load_crosscoder_module(store: Store, name: str) -> tuple[BatchTopKCrosscoder, dict[str, Any]]:
    """The stored crosscoder's module (weights hash checked) and its config.

    Example
    -------
    >>> module, cfg = load_crosscoder_module(st, "cc_l2")  # doctest: +SKIP
    """
    from safetensors.torch import load

    rows = store.sql(
        "SELECT source, weights_hash, config, architecture FROM saes WHERE name = ?", [name]
    ).fetchall()
    if not rows or rows[0][3] != ARCHITECTURE:
        raise InputError(f"no crosscoder named {name!r} in the store")
    source, recorded, cfg_json, _ = rows[0]
    blob = store.location.read_bytes(f"{source}/weights.safetensors")
    if hashlib.sha256(blob).hexdigest()[:32] != recorded:
        raise InputError(
            f"crosscoder {name!r}: {source}/weights.safetensors does not match its recorded hash; "
            "the file is damaged"
        )
    cfg = json.loads(cfg_json)
    module = BatchTopKCrosscoder(len(cfg["runs"]), cfg["d_in"], cfg["d_sae"], cfg["train"]["k"])
    module.load_state_dict(load(blob))
    module.eval()
    return module, cfg


def exclusive_latents(
    store: Store,
    name: str,
    run: str,
    *,
    group: str = "triggered",
    positions: str | None = None,
) -> Any:
    """The latents exclusive to one run of a stored crosscoder, with how they fire by group.

    ``trigger_diff`` of the crosscoder's latents on ``run`` (group A: the predicate
    ``group``; B: the rest), restricted to the latents classified ``only:{run}``,
    largest firing-frequency difference first.

    Example
    -------
    >>> exclusive_latents(st, "cc_l2", "backdoored/pairs").df()  # doctest: +SKIP
    """
    import pyarrow.compute as pc

    from actstore.queries import run_named
    from actstore.store.result import Result

    rows = store.sql(
        "SELECT sae_id FROM saes WHERE name = ? AND architecture = ?", [name, ARCHITECTURE]
    ).fetchall()
    if not rows:
        raise InputError(f"no crosscoder named {name!r} in the store")
    sid = int(rows[0][0])
    latents = store.sql(
        "SELECT feature, class, delta_norm, fire_rate FROM crosscoder_latents "
        "WHERE sae_id = ? AND class = ? ORDER BY feature",
        [sid, f"only:{run}"],
    ).arrow()
    params: dict[str, Any] = {"run": run, "sae": name, "group_a": group}
    if positions is not None:
        params["positions"] = positions
    diff = run_named(store, "trigger_diff", cache=False, **params).arrow()
    keep = pc.is_in(diff.column("feature"), value_set=latents.column("feature"))
    diff = diff.filter(keep)
    order = {int(f): i for i, f in enumerate(latents.column("feature").to_pylist())}
    idx = [order[int(f)] for f in diff.column("feature").to_pylist()]
    out = pa.table(
        {
            "feature": diff.column("feature"),
            "class": latents.column("class").take(idx),
            "delta_norm": latents.column("delta_norm").take(idx),
            "freq_a": diff.column("freq_a"),
            "freq_b": diff.column("freq_b"),
            "mean_a": diff.column("mean_a"),
            "mean_b": diff.column("mean_b"),
        }
    )
    gap = np.asarray(out.column("freq_a"), np.float64) - np.asarray(
        out.column("freq_b"), np.float64
    )
    return Result(out.take(np.argsort(-gap, kind="stable")))
