"""Sweeps: one edit spec, many settings, one run each, compared as a steering curve.

In an edit file, ``alpha`` or ``value`` (the numeric fields), ``hook`` and
``positions`` of any op may be a list, and ``hook`` may be a pattern
(``blocks.*.hook_resid_post``, ``blocks.1-2.hook_resid_post``)::

    name = "steer_alpha"
    where = "NOT triggered"
    [[ops]]
    kind = "steer"
    direction = "demo_backdoored/mean_diff/blocks.2.hook_resid_post"
    hook = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    alpha = [0, 0.5, 1, 2, 4]
    positions = "after:?"

:class:`Sweep` expands it into one :class:`~actstore.edits.spec.EditSpec` per
combination (the cartesian product, in file order), named by its setting
(``steer_alpha@hook=blocks.1.hook_resid_post,alpha=0.5``) and recording
``sweep`` and ``setting`` in the store's ``edits`` table. :func:`run_sweep`
(``actstore edit JOB SWEEP``) checks every setting first, then runs them all
with each checkpoint loaded once: ``k`` settings cost ``k`` generation and
capture passes, not ``k`` model loads (the settings' forward passes are not
stacked into one batch). :func:`sweep_table` (``actstore eval --sweep NAME``)
tabulates :func:`~actstore.edits.evaluate.evaluate` against the swept values
and :func:`plot_sweep` (``--plot``) draws the steering curve: a column against
the numeric swept field, one line per other setting (e.g. per layer).

Example
-------
>>> sw = Sweep.from_dict({"name": "s", "ops": [
...     {"kind": "steer", "hook": "h", "file": "/v.npy", "alpha": [0, 2]}]})
>>> [e.name for _, e in sw.settings()]
['s@alpha=0', 's@alpha=2']
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from actstore import spec as _spec
from actstore.edits.spec import EditSpec
from actstore.errors import InputError, NotFoundError, SpecError
from actstore.store.result import Result

if TYPE_CHECKING:
    from actstore.ingest.job import IngestJob
    from actstore.ingest.runner import IngestSummary
    from actstore.store.store import Store

__all__ = ["SWEEPABLE", "Sweep", "is_sweep", "plot_sweep", "run_sweep", "sweep_table"]

SWEEPABLE = ("hook", "positions", "alpha", "value")
"""Op fields that may be lists (``hook`` also a pattern)."""

_PATTERN = re.compile(r"[*]|\d+-\d+")


def _is_axis(field: str, value: Any) -> bool:
    if field not in SWEEPABLE:
        return False
    if isinstance(value, list | tuple):
        return True
    return field == "hook" and isinstance(value, str) and bool(_PATTERN.search(value))


def is_sweep(data: Mapping[str, Any]) -> bool:
    """Whether an edit dict sweeps a field (a list, or a hook pattern).

    Example
    -------
    >>> is_sweep({"name": "e", "ops": [{"kind": "steer", "alpha": [1, 2]}]})
    True
    """
    ops = data.get("ops") if isinstance(data, Mapping) else None
    return any(_is_axis(k, v) for op in ops or [] if isinstance(op, Mapping) for k, v in op.items())


def _label(value: Any) -> str:
    text = format(value, "g") if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", text)


@dataclass(frozen=True)
class Sweep:
    """An edit spec with swept fields; :meth:`settings` expands it.

    Example
    -------
    >>> Sweep.from_dict({"name": "s", "ops": [{"kind": "steer", "hook": "h",
    ...     "file": "/v.npy", "alpha": [1, 2]}]}).axes
    ((0, 'alpha', (1, 2)),)
    """

    name: str
    data: Mapping[str, Any]
    """The edit dict, swept fields included."""
    axes: tuple[tuple[int, str, Any], ...]
    """``(op index, field, values or hook pattern)`` in file order."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base_dir: str | Path | None = None) -> Sweep:
        """Build from an edit dict; its settings are checked as edits at once.

        Example
        -------
        >>> Sweep.from_dict({"name": "s", "ops": [{"kind": "steer", "hook": "h",
        ...     "file": "/v.npy", "alpha": []}]})
        Traceback (most recent call last):
        ...
        actstore.errors.SpecError: sweep 's' ops[0]: alpha = [] is an empty list; give the values to sweep
        """
        if not isinstance(data, Mapping) or not isinstance(data.get("name"), str):
            raise SpecError("sweep: the edit needs a name")
        name = str(data["name"])
        for key in ("sweep", "setting"):
            if key in data:
                raise SpecError(f"sweep {name!r}: `{key}` is set by the sweep itself; remove it")
        axes = []
        for i, op in enumerate(data.get("ops") or []):
            if not isinstance(op, Mapping):
                continue
            for k, v in op.items():
                if _is_axis(k, v):
                    if isinstance(v, list | tuple) and not v:
                        raise SpecError(
                            f"sweep {name!r} ops[{i}]: {k} = [] is an empty list; give the "
                            "values to sweep"
                        )
                    axes.append((i, k, tuple(v) if isinstance(v, list | tuple) else v))
        if not axes:
            raise SpecError(f"sweep {name!r}: no op field is a list or a hook pattern")
        sweep = cls(name, dict(data), tuple(axes))
        base = None if base_dir is None else Path(base_dir)
        for _, spec in sweep.settings(n_layers=None, base_dir=base):  # check every setting
            del spec
        return sweep

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> Sweep:
        """Load a sweep from an edit file.

        Example
        -------
        >>> Sweep.from_toml("edits/steer_sweep.toml")  # doctest: +SKIP
        """
        return cls.from_dict(_spec.load_toml(Path(path)), base_dir=Path(path).resolve().parent)

    def keys(self) -> list[str]:
        """The setting's keys: the field name, or ``ops{i}.{field}`` where two ops sweep it.

        Example
        -------
        >>> Sweep("s", {}, ((0, "alpha", (1,)), (1, "alpha", (2,)))).keys()
        ['ops0.alpha', 'ops1.alpha']
        """
        fields = [f for _, f, _ in self.axes]
        return [f if fields.count(f) == 1 else f"ops{i}.{f}" for i, f, _ in self.axes]

    def settings(
        self, n_layers: int | None = None, base_dir: Path | None = None
    ) -> list[tuple[dict[str, Any], EditSpec]]:
        """Every combination: ``(setting, EditSpec)``, in file order.

        Parameters
        ----------
        n_layers
            The model's layer count, to expand hook patterns (None: a pattern
            stands as one placeholder value, for checking).
        base_dir
            Relative ``file`` / ``sae_path`` resolve against it.

        Example
        -------
        >>> sw = Sweep.from_dict({"name": "s", "ops": [{"kind": "steer", "file": "/v.npy",
        ...     "hook": "blocks.*.hook_resid_post", "alpha": [1]}]})
        >>> [s for s, _ in sw.settings(n_layers=2)]
        [{'hook': 'blocks.0.hook_resid_post', 'alpha': 1}, {'hook': 'blocks.1.hook_resid_post', 'alpha': 1}]
        """
        from actstore.ingest.hooks import expand_hooks

        values = []
        for _, _field, v in self.axes:
            if isinstance(v, str):  # a hook pattern
                v = tuple(expand_hooks([v], n_layers)) if n_layers is not None else (v,)
            values.append(v)
        out = []
        keys = self.keys()
        for combo in itertools.product(*values):
            ops = [dict(op) for op in self.data.get("ops") or []]
            for (i, field, _), value in zip(self.axes, combo, strict=True):
                ops[i][field] = value
            setting = dict(zip(keys, combo, strict=True))
            name = f"{self.name}@" + ",".join(f"{k}={_label(v)}" for k, v in setting.items())
            data = {**self.data, "name": name, "ops": ops, "sweep": self.name, "setting": setting}
            try:
                spec = EditSpec.from_dict(data, base_dir=base_dir)
            except SpecError as e:
                raise SpecError(f"sweep {self.name!r} setting {setting}: {e}") from None
            out.append((setting, spec))
        return out


def _n_layers(job: IngestJob) -> int:
    from transformers import AutoConfig

    from actstore.ingest.families import adapter_for

    ck = job.checkpoints[0]
    config = AutoConfig.from_pretrained(
        ck.path or job.model.path,
        revision=(ck.revision or job.model.revision) or None,
        trust_remote_code=job.model.trust_remote_code,
    )
    return adapter_for(config).n_layers


def run_sweep(
    job: IngestJob | str | os.PathLike[str],
    sweep: Sweep | Mapping[str, Any] | str | os.PathLike[str],
    *,
    quiet: bool | None = None,
    **overrides: Any,
) -> IngestSummary:
    """Run every setting of a sweep as an edited run: ``actstore edit JOB SWEEP``.

    Every setting is resolved and checked against the job before anything is
    written; each checkpoint is then loaded once for all settings.

    Parameters
    ----------
    job
        An :class:`~actstore.ingest.job.IngestJob` or the path of a job file.
    sweep
        A :class:`Sweep`, an edit dict with swept fields, or an edit file.
    quiet
        No progress bar.
    **overrides
        Job settings to replace, as for :func:`~actstore.ingest.runner.run_job`.

    Example
    -------
    >>> print(run_sweep("job.toml", "edits/steer_sweep.toml"))  # doctest: +SKIP
    """
    from actstore.edits.apply import _check_job, _open, edit_context, resolve_edit
    from actstore.ingest.job import IngestJob
    from actstore.ingest.runner import run_job

    if not isinstance(job, IngestJob):
        job = IngestJob.from_toml(Path(job))
    job = job.with_overrides(**overrides)
    if isinstance(sweep, Mapping):
        sweep = Sweep.from_dict(sweep)
    elif not isinstance(sweep, Sweep):
        sweep = Sweep.from_toml(sweep)
    specs = [spec for _, spec in sweep.settings(_n_layers(job))]
    st = _open(job.store)
    for spec in specs:  # everything is checked before anything is written
        _check_job(resolve_edit(spec, st), job, st)
    # recorded once the job is checked against the store and holds its write lock
    return run_job(
        job, quiet=quiet, edit=lambda st: [edit_context(st, spec, job=job) for spec in specs]
    )


def _members(st: Store, name: str) -> list[tuple[str, dict[str, Any]]]:
    """(run name, setting) of every run of the sweep, in run order."""
    rows = st.sql(
        "SELECT r.name, e.name, e.spec FROM runs r JOIN edits e USING (edit_id) ORDER BY r.run_id"
    ).fetchall()
    out = []
    for run, edit, spec in rows:
        d = json.loads(spec or "{}") or {}
        if d.get("sweep") == name:
            setting = dict(d.get("setting") or {})
            # the catalog keeps JSON keys sorted; the edit's name keeps the sweep's order
            order = [part.split("=", 1)[0] for part in str(edit).split("@", 1)[-1].split(",")]
            keys = [k for k in order if k in setting] + [k for k in setting if k not in order]
            out.append((str(run), {k: setting[k] for k in keys}))
    return out


def sweep_table(
    store: Store | str | os.PathLike[str],
    name: str,
    **evaluate_args: Any,
) -> Result:
    """The sweep's runs against their settings: ``actstore eval --sweep NAME``.

    Parameters
    ----------
    store
        The store (or its path).
    name
        The sweep's name (the edit file's ``name``).
    **evaluate_args
        Passed to :func:`~actstore.edits.evaluate.evaluate` (``scorer``,
        ``measure``, ``reference``, ...).

    Returns
    -------
    Result
        One column per swept field, then every column of ``evaluate``; rows
        sorted by the setting (numeric fields numerically).

    Example
    -------
    >>> print(sweep_table(st, "steer_alpha", measure=True))  # doctest: +SKIP
    """
    from actstore.edits.evaluate import _open, evaluate

    st = _open(store)
    members = _members(st, name)
    if not members:
        sweeps = sorted(
            {
                str(d["sweep"])
                for (s,) in st.sql("SELECT spec FROM edits").fetchall()
                if (d := json.loads(s or "{}") or {}).get("sweep")
            }
        )
        raise NotFoundError(
            f"sweep {name!r} has no runs in this store; sweeps: {sweeps} (run it with "
            "`actstore edit JOB SWEEP.toml`)"
        )
    keys = list(dict.fromkeys(k for _, s in members for k in s))

    def order(value: Any) -> tuple[int, float, str]:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return (0, float(value), "")
        return (1, 0.0, str(value))

    members.sort(key=lambda m: tuple(order(m[1].get(k)) for k in keys))
    table = evaluate(st, [r for r, _ in members], **evaluate_args).arrow()
    cols: list[pa.Array] = []
    for k in keys:
        vals = [s.get(k) for _, s in members]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in vals)
        cols.append(pa.array([float(v or 0) for v in vals] if numeric else [str(v) for v in vals]))
    for i, k in enumerate(keys):
        table = table.add_column(i, k, cols[i])
    return Result(table)


def plot_sweep(
    table: Result | pa.Table,
    path: str | os.PathLike[str],
    *,
    metric: str | None = None,
    x: str | None = None,
) -> Path:
    """The steering curve: ``metric`` against the numeric swept field, a line per other setting.

    Parameters
    ----------
    table
        :func:`sweep_table`'s result.
    path
        The PNG to write.
    metric
        The column to plot (default ``rate_clean``, else ``rate_triggered``).
    x
        The x axis (default: the first numeric swept field).

    Example
    -------
    >>> plot_sweep(sweep_table(st, "steer_alpha"), "curve.png")  # doctest: +SKIP
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    t = table.arrow() if isinstance(table, Result) else table
    names = t.column_names
    settings = names[: names.index("run")]
    numeric = [c for c in settings if pa.types.is_floating(t.schema.field(c).type)]
    x = x or (numeric[0] if numeric else None)
    if x is None or x not in settings:
        raise InputError(
            f"plot_sweep: x {x!r} is not a numeric swept field; swept fields: {settings}"
        )
    if metric is None:
        metric = next(
            (m for m in ("rate_clean", "rate_triggered") if t.column(m).null_count < t.num_rows),
            "rate_clean",
        )
    if metric not in names or not pa.types.is_floating(t.schema.field(metric).type):
        numeric_cols = [c for c in names if pa.types.is_floating(t.schema.field(c).type)]
        raise InputError(
            f"plot_sweep: metric {metric!r} is not a numeric column; use one of {numeric_cols}"
        )
    others = [c for c in settings if c != x]
    rows = t.to_pylist()
    lines: dict[tuple[Any, ...], list[tuple[float, float]]] = {}
    for r in rows:
        if r[metric] is not None:
            lines.setdefault(tuple(r[c] for c in others), []).append((r[x], r[metric]))
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for key, pts in lines.items():
        pts.sort()
        label = ", ".join(f"{c}={v}" for c, v in zip(others, key, strict=True)) or metric
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs {x}")
    ax.grid(alpha=0.3)
    if lines:
        ax.legend(fontsize=7)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, format="png")
    return out
