"""Edit specs: what an edit changes, as frozen dataclasses loaded from TOML.

An edit is a named list of ops (:class:`EditSpec`). Each op (:class:`EditOp`)
has a ``kind`` from the registry in :mod:`actstore.edits.ops`, the ``hook``
whose activations it changes, the ``positions`` it changes there, and the
fields its kind takes (a direction, an SAE and features, a source run...). Ops
apply in order; several ops on one hook compose. An edit without ops changes
nothing (a control: its KL to the unedited model is 0).

Specs are validated on construction: an unknown key, a field that the op's
kind does not take, or a missing one is a :class:`~actstore.errors.SpecError`
naming the op and listing what is valid. Names (directions, SAEs, runs) are
resolved against a store only when the edit is applied
(:mod:`actstore.edits.apply`).

An edit file::

    name = "ablate_trigger"
    description = "remove the trigger direction at layer 2"

    [[ops]]
    kind = "ablate_direction"
    hook = "blocks.2.hook_resid_post"
    direction = "trigger_l2"          # a direction in the store, or: file = "u.npy"

    [[ops]]
    kind = "steer"
    hook = "blocks.2.hook_resid_post"
    direction = "trigger_l2"
    alpha = -4.0
    positions = "completion"          # all | prompt | completion | last | after:TEXT | span:TEXT | offset:-N

Example
-------
>>> spec = EditSpec(name="ablate", ops=[EditOp(kind="ablate_direction",
...                 hook="blocks.2.hook_resid_post", direction="trigger_l2")])
>>> spec.to_dict()["ops"][0]
{'kind': 'ablate_direction', 'hook': 'blocks.2.hook_resid_post', 'positions': 'all', 'direction': 'trigger_l2'}
>>> EditOp(kind="steer", hook="blocks.0.hook_resid_post", direction="d", features=[1])
Traceback (most recent call last):
...
actstore.errors.SpecError: op steer: `features` does not apply to steer; it takes kind, hook, positions, direction, file, alpha, normalize
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actstore import spec as _spec
from actstore.edits.ops import get_kind
from actstore.edits.positions import POLICIES, parse_edit_positions
from actstore.edits.subset import check_predicate
from actstore.errors import SpecError
from actstore.ingest.logit_metrics import MetricSpec

__all__ = ["EditOp", "EditSpec"]

_NAME_RE = re.compile(r"[A-Za-z0-9_.\-][A-Za-z0-9_.\-@=,]*")
_COMMON = ("kind", "hook", "positions")
_PATH_FIELDS = ("file", "sae_path")


@dataclass(frozen=True)
class EditOp:
    """One op of an edit: a ``[[ops]]`` table. Which fields apply depends on ``kind``.

    Example
    -------
    >>> EditOp(kind="clamp_features", sae="l2_resid", features=[3, 7], value=5.0).hook is None
    True
    >>> EditOp(kind="patch", hook="blocks.1.hook_resid_post", source_run="ft/pairs",
    ...        positions="prompt").positions
    'prompt'
    """

    kind: str
    """The op kind: ``ablate_direction``, ``steer``, ``ablate_subspace``, ``project_subspace``,
    ``ablate_features``, ``clamp_features``, ``keep_features`` or ``patch``."""
    hook: str | None = None
    """The hook whose activations change. Default: the hook recorded with the named
    direction(s) or SAE; required with ``file`` and ``patch``."""
    positions: str = "all"
    """Which tokens change: ``all``; ``prompt`` (prompt tokens); ``completion`` (generated
    tokens: the decoding steps during generation, the completion tokens of a capture);
    ``last`` (the last prompt token, no generated one); ``after:TEXT`` (every token after
    the first match of TEXT, generated ones included); ``span:TEXT`` (prompt tokens
    overlapping TEXT); ``offset:-N`` (prompt token ``n - N``). See
    :mod:`actstore.edits.positions` for the table."""
    direction: str | None = None
    """A direction in the store (``ablate_direction``, ``steer``)."""
    directions: Sequence[str] | None = None
    """Directions in the store spanning a subspace (``ablate_subspace``, ``project_subspace``)."""
    file: str | None = None
    """A ``.npy`` file instead of stored directions: a ``(D,)`` vector or ``(K, D)`` matrix."""
    alpha: float | None = None
    """``steer``: the multiplier of the vector (default 1.0; negative steers away)."""
    normalize: bool | None = None
    """``steer``: scale the vector to unit norm first (default false: CAA adds it as stored)."""
    sae: str | None = None
    """SAE ops: an SAE in the store's ``saes`` table."""
    sae_path: str | None = None
    """SAE ops: a directory saved by sae_lens, instead of ``sae``."""
    features: Sequence[int] | None = None
    """SAE ops: the feature indices to ablate, clamp or keep."""
    value: float | None = None
    """``clamp_features``: the value the features are set to."""
    source_run: str | None = None
    """``patch``: the run whose stored activations replace this hook's."""

    def __post_init__(self) -> None:
        kind = get_kind(self.kind)  # SpecError listing the kinds
        where = f"op {self.kind}"
        for name in ("directions", "features"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)  # `directions = "d"` means a list of one
            if value is not None and not isinstance(value, list | tuple):
                raise SpecError(f"{where}: {name} must be a list, got {value!r}")
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        allowed = {*_COMMON, *kind.fields()}
        for f in dataclasses.fields(self):
            if f.name not in allowed and getattr(self, f.name) is not None:
                raise SpecError(
                    f"{where}: `{f.name}` does not apply to {self.kind}; it takes "
                    f"{', '.join([*_COMMON, *kind.fields()])}"
                )
        if self.hook is not None and (not isinstance(self.hook, str) or not self.hook):
            raise SpecError(f"{where}: hook must be a hook name, got {self.hook!r}")
        try:
            parse_edit_positions(self.positions)
        except (SpecError, TypeError):
            raise SpecError(
                f"{where}: positions {self.positions!r} is not one of {', '.join(POLICIES)}"
            ) from None
        for name in ("alpha", "value"):
            v = getattr(self, name)
            if v is not None and (
                isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
            ):
                raise SpecError(f"{where}: {name} must be a finite number, got {v!r}")
        if self.features is not None:
            bad = [f for f in self.features if isinstance(f, bool) or not isinstance(f, int)]
            if bad or any(f < 0 for f in self.features):
                raise SpecError(
                    f"{where}: features must be non-negative feature indices, got {list(self.features)}"
                )
            dup = sorted({f for f in self.features if self.features.count(f) > 1})
            if dup:
                raise SpecError(f"{where}: features {dup} are listed more than once")
        kind.check(self, where)

    def to_dict(self) -> dict[str, Any]:
        """The fields this op sets, as in its ``[[ops]]`` table.

        Example
        -------
        >>> EditOp(kind="steer", hook="h", direction="d", alpha=2.0).to_dict()
        {'kind': 'steer', 'hook': 'h', 'positions': 'all', 'direction': 'd', 'alpha': 2.0}
        """
        return _spec.to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "[[ops]]") -> EditOp:
        """Build an op from a ``[[ops]]`` table; unknown keys are errors.

        Example
        -------
        >>> EditOp.from_dict({"kind": "steer", "hook": "h", "file": "v.npy", "alpha": 2}).alpha
        2.0
        """
        return _spec.from_dict(cls, data, where=where)


@dataclass(frozen=True)
class EditSpec:
    """A named edit: ops applied in order. Build with :meth:`from_toml` or :meth:`from_dict`.

    Example
    -------
    >>> EditSpec.from_dict({"name": "steer", "ops": [
    ...     {"kind": "steer", "hook": "blocks.1.hook_resid_post", "direction": "d", "alpha": 4}
    ... ]}).ops[0].alpha
    4.0
    """

    name: str
    """The edit's unique name in the store; edited runs are named ``{checkpoint}/{prompts}+{name}``."""
    ops: Sequence[EditOp] = field(default_factory=tuple)
    """The ops, applied in order (an empty list is the no-op control)."""
    description: str | None = None
    """Free text, kept with the spec."""
    where: str | None = None
    """A SQL predicate over the prompt labels (``"NOT triggered"``): the edited run holds
    only these prompts; the unedited parent supplies the rest (:mod:`actstore.edits.subset`)."""
    metrics: Sequence[MetricSpec] = field(default_factory=tuple)
    """Logit metrics measured in the edited runs' capture pass, beside the job's own
    (``[[metrics]]``, :mod:`actstore.ingest.logit_metrics`)."""
    sweep: str | None = None
    """The sweep this edit is one setting of (set by :mod:`actstore.edits.sweep`)."""
    setting: dict[str, Any] | None = None
    """Its values of the swept fields, e.g. ``{"alpha": 0.5}`` (set with ``sweep``)."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.fullmatch(self.name):
            raise SpecError(
                f"edit name {self.name!r} must be letters, digits, '_', '.' or '-' "
                "(it becomes part of run names)"
            )
        ops = self.ops
        if isinstance(ops, EditOp) or not isinstance(ops, list | tuple):
            raise SpecError(f"edit {self.name!r}: ops must be a list of ops, got {ops!r}")
        converted = []
        for i, op in enumerate(ops):
            if isinstance(op, Mapping):
                op = EditOp.from_dict(op, where=f"edit {self.name!r} ops[{i}]")
            if not isinstance(op, EditOp):
                raise SpecError(f"edit {self.name!r} ops[{i}]: expected an op table, got {op!r}")
            converted.append(op)
        object.__setattr__(self, "ops", tuple(converted))
        if self.where is not None:
            try:
                check_predicate(self.where)
            except SpecError as e:
                raise SpecError(f"edit {self.name!r}: {e}") from None
        metrics = []
        for m in self.metrics:
            metrics.append(MetricSpec.from_dict(m) if isinstance(m, Mapping) else m)
            if not isinstance(metrics[-1], MetricSpec):
                raise SpecError(f"edit {self.name!r}: metrics must be [[metrics]] tables")
        object.__setattr__(self, "metrics", tuple(metrics))
        if (self.sweep is None) != (self.setting is None):
            raise SpecError(f"edit {self.name!r}: sweep and setting are set together, by a sweep")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base_dir: str | Path | None = None) -> EditSpec:
        """Build from a dict; relative ``file``/``sae_path`` resolve against ``base_dir``.

        Example
        -------
        >>> EditSpec.from_dict({"name": "e", "opz": []})
        Traceback (most recent call last):
        ...
        actstore.errors.SpecError: edit: unknown key 'opz'; valid keys: name, ops, description, where, metrics, sweep, setting
        """
        if isinstance(data, Mapping) and isinstance(data.get("ops"), list | tuple):
            name = data.get("name")
            ops = []
            for i, op in enumerate(data["ops"]):
                where = f"edit {name!r} ops[{i}]"
                try:
                    ops.append(EditOp.from_dict(op, where=where) if isinstance(op, Mapping) else op)
                except SpecError as e:
                    # name the op's place in the file: "op steer: ..." -> "edit 'e' ops[1] (steer): ..."
                    msg = str(e)
                    kind = op.get("kind") if isinstance(op, Mapping) else None
                    if msg.startswith(f"op {kind}: "):
                        msg = f"{where} ({kind}): {msg[len(f'op {kind}: ') :]}"
                    raise SpecError(msg) from None
            data = {**data, "ops": ops}
        spec = _spec.from_dict(cls, data, where="edit")
        return spec.resolve_paths(base_dir) if base_dir is not None else spec

    @classmethod
    def from_toml(cls, path: str | Path) -> EditSpec:
        """Load an edit file; relative paths in it are relative to the file.

        Example
        -------
        >>> spec = EditSpec.from_toml("edits/ablate.toml")  # doctest: +SKIP
        """
        return cls.from_dict(_spec.load_toml(path), base_dir=Path(path).resolve().parent)

    def to_dict(self) -> dict[str, Any]:
        """The spec as a TOML/JSON-ready dict (unset fields left out).

        Example
        -------
        >>> EditSpec(name="noop").to_dict()
        {'name': 'noop', 'ops': []}
        """
        d = _spec.to_dict(self)
        if not d.get("metrics"):  # as before metrics existed: same spec, same hash
            d.pop("metrics", None)
        return d

    def to_toml(self) -> str:
        """The spec as the text of an edit file.

        Example
        -------
        >>> print(EditSpec(name="e", ops=[EditOp(kind="steer", hook="h", file="/v.npy")]).to_toml())
        name = "e"
        <BLANKLINE>
        [[ops]]
        kind = "steer"
        hook = "h"
        positions = "all"
        file = "/v.npy"
        <BLANKLINE>
        """

        def value(v: Any) -> str:
            if isinstance(v, bool):
                return "true" if v else "false"
            if isinstance(v, list | tuple):
                return "[" + ", ".join(value(x) for x in v) + "]"
            if isinstance(v, str):
                return json.dumps(v)
            if isinstance(v, Mapping):
                return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + "}"
            return repr(v)

        d = self.to_dict()
        lines = [f"{k} = {value(v)}" for k, v in d.items() if k not in ("ops", "metrics")]
        for table in ("ops", "metrics"):
            for entry in d.get(table, []):
                lines += ["", f"[[{table}]]", *(f"{k} = {value(v)}" for k, v in entry.items())]
        return "\n".join(lines) + "\n"

    def hash(self) -> str:
        """A hash of the spec dict (what :func:`~actstore.edits.apply.edit_context` records).

        Example
        -------
        >>> EditSpec(name="a").hash() == EditSpec.from_dict({"name": "a", "ops": []}).hash()
        True
        """
        body = json.dumps(self.to_dict(), sort_keys=True, default=str)
        return hashlib.sha256(body.encode()).hexdigest()[:32]

    def resolve_paths(self, base_dir: str | Path) -> EditSpec:
        """Make relative ``file`` and ``sae_path`` values absolute against ``base_dir``.

        Example
        -------
        >>> s = EditSpec(name="e", ops=[EditOp(kind="steer", hook="h", file="v.npy")])
        >>> s.resolve_paths("/data").ops[0].file
        '/data/v.npy'
        """
        base = Path(base_dir)

        def fix(op: EditOp) -> EditOp:
            changes: dict[str, Any] = {
                name: str(base / p)
                for name in _PATH_FIELDS
                if (p := getattr(op, name)) is not None and not Path(p).is_absolute()
            }
            return dataclasses.replace(op, **changes) if changes else op

        return dataclasses.replace(self, ops=tuple(fix(op) for op in self.ops))
