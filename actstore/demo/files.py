"""The job and edit files of the worked example, written where a user can copy them.

``actstore demo DIR`` runs its ingests and edits from Python; so that a user can
re-run or adapt them with the CLI (``actstore ingest DIR/jobs/pairs.toml``,
``actstore edit DIR/jobs/edit_base.toml DIR/edits/ablate_trigger_dir.toml``), it
writes each as a TOML file. Paths inside the output directory are written
relative to the file (the directory can be moved); the files load with
:meth:`actstore.ingest.job.IngestJob.from_toml` and
:meth:`actstore.edits.spec.EditSpec.from_toml`.

Example
-------
>>> print(toml_text({"store": "s", "capture": {"hooks": ["h"]}, "prompts": [{"name": "p"}]}))
store = "s"
<BLANKLINE>
[capture]
hooks = ["h"]
<BLANKLINE>
[[prompts]]
name = "p"
<BLANKLINE>
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["toml_text", "write_job"]

#: Keys of an ingest job (and of its tables) that hold local paths.
_PATH_KEYS = {"store", "path", "tokenizer"}


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} {v!r} as a TOML value")


def _is_table_list(v: Any) -> bool:
    return isinstance(v, list | tuple) and bool(v) and all(isinstance(x, Mapping) for x in v)


def _table(d: Mapping[str, Any], prefix: str, header: str | None) -> list[str]:
    lines = [header] if header else []
    for k, v in d.items():
        if v is None or isinstance(v, Mapping) or _is_table_list(v):
            continue
        lines.append(f"{k} = {_value(v)}")
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            lines += ["", *_table(v, f"{name}.", f"[{name}]")]
        elif _is_table_list(v):
            for item in v:
                lines += ["", *_table(item, f"{name}.", f"[[{name}]]")]
    return lines


def toml_text(d: Mapping[str, Any]) -> str:
    """``d`` (strings, numbers, booleans, lists, tables, lists of tables) as TOML text.

    Example
    -------
    >>> toml_text({"a": 1, "b": [True, "x"]})
    'a = 1\\nb = [true, "x"]\\n'
    """
    return "\n".join(_table(d, "", None)) + "\n"


def _relative(d: Any, base: Path, inside: Path) -> Any:
    """Local paths under ``inside`` made relative to ``base`` (other values unchanged)."""
    if isinstance(d, Mapping):
        out = {}
        for k, v in d.items():
            if k in _PATH_KEYS and isinstance(v, str) and v and "://" not in v:
                p = Path(v).resolve()
                v = os.path.relpath(p, base) if p.is_relative_to(inside) else str(p)
            out[k] = _relative(v, base, inside)
        return out
    if isinstance(d, list | tuple):
        return [_relative(x, base, inside) for x in d]
    return d


def write_job(path: str | Path, job: Mapping[str, Any], *, out_dir: str | Path) -> Path:
    """Write an ingest job dict as ``path`` (paths under ``out_dir`` relative to the file).

    Example
    -------
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> p = write_job(d / "jobs" / "j.toml", {"store": str(d / "store")}, out_dir=d)
    >>> p.read_text()
    'store = "../store"\\n'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent.resolve()
    path.write_text(toml_text(_relative(dict(job), base, Path(out_dir).resolve())))
    return path
