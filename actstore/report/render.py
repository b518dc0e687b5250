"""How a report page is made and named: templates, token shading, content keys, safe writes.

Every page of the site (see :mod:`actstore.report.site`) is a Jinja2 template
from ``templates/`` rendered with autoescaping, so text from the store is shown,
never run. A page's key is a hash of what it shows together with the layout
(:data:`LAYOUT_VERSION`, a hash of the templates) and the actstore version, so a
changed template or release rebuilds every page. Files are written to a
temporary name and moved into place, so a reader never sees half a page. The
file names of pages live here too, so every page links to the others the same way.

Example
-------
>>> shade(-1.0, 2.0)
'rgba(40, 90, 220, 0.450)'
>>> digest({"a": 1}) == digest({"a": 1}), len(digest({"a": 1}))
(True, 20)
>>> prompt_page("my set", 0)
'prompt-my_set-0.html'
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import actstore
from actstore.report import data as D
from actstore.report import features as F

TEMPLATES = Path(__file__).parent / "templates"
"""The folder of the page templates and the stylesheet."""
#: A hash of the templates: part of every page's key, so a changed layout rebuilds every page.
LAYOUT_VERSION = hashlib.sha256(
    b"".join(p.name.encode() + p.read_bytes() for p in sorted(TEMPLATES.iterdir()))
).hexdigest()[:12]


def environment() -> Any:
    """The Jinja2 environment of the templates: autoescaping, undefined names are errors.

    Returns
    -------
    jinja2.Environment
        With :func:`shade` available to every template.

    Example
    -------
    >>> environment().from_string("{{ x }}").render(x="<b>")
    '&lt;b&gt;'
    """
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=False,
    )
    env.globals["shade"] = shade
    return env


def shade(value: float | None, scale: float | None) -> str:
    """CSS colour of a token: red for positive values, blue for negative, by ``|value| / scale``.

    Example
    -------
    >>> shade(0.5, 1.0), shade(None, 1.0)
    ('rgba(220, 40, 40, 0.450)', 'transparent')
    """
    if value is None or not scale:
        return "transparent"
    a = min(1.0, abs(float(value)) / scale) * 0.9
    return f"rgba(220, 40, 40, {a:.3f})" if value > 0 else f"rgba(40, 90, 220, {a:.3f})"


def digest(obj: Any) -> str:
    """A page's key: a hash of what it shows, the layout and the actstore version.

    Parameters
    ----------
    obj
        Anything JSON can write (other values by their ``str``); dict keys are sorted.

    Returns
    -------
    str
        20 hex digits.

    Example
    -------
    >>> digest({"a": 1, "b": 2}) == digest({"b": 2, "a": 1})
    True
    """
    text = json.dumps([LAYOUT_VERSION, actstore.__version__, obj], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (UTF-8) through a temporary file, so it appears whole or not at all.

    Example
    -------
    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "page.html"
    >>> write(p, "<p>hi</p>"); p.read_text()
    '<p>hi</p>'
    """
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def analysis_page(aid: int) -> str:
    """File name of an analysis page.

    Example
    -------
    >>> analysis_page(3)
    'analysis-3.html'
    """
    return f"analysis-{aid}.html"


def feature_page(ref: F.FeatureRef) -> str:
    """File name of a feature page.

    Example
    -------
    >>> feature_page(F.FeatureRef("l2 resid", 1, 206, ""))
    'feature-l2_resid-206.html'
    """
    return f"feature-{ref.slug}.html"


def prompt_page(prompt_set: str, idx: int) -> str:
    """File name of a prompt page.

    Example
    -------
    >>> prompt_page("pairs", 7)
    'prompt-pairs-7.html'
    """
    return f"prompt-{D.safe_name(prompt_set)}-{idx}.html"
