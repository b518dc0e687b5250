"""A store you can look at: a static, offline HTML report with analysis, feature and prompt pages.

:func:`build_report` writes a folder of HTML pages and SVG figures (no script,
no network) from a store, opened read-only: an index of runs, prompt sets,
behaviour, analyses and directions; a page per stored analysis (any kind);
a page per selected SAE feature; a page per prompt. Rebuilding updates only the
pages whose content changed. ``actstore report STORE -o DIR`` is the command.

Example
-------
>>> from actstore.report import build_report, ReportOptions
>>> print(build_report("demo-out/store", "demo-out/report",
...                    ReportOptions(n_features=5)))  # doctest: +SKIP
report demo-out/report: 30 pages (30 written, 0 unchanged, 0 removed) in 8.1 s; ...
"""

from __future__ import annotations

from actstore.report.site import ReportOptions, ReportSummary, build_report

__all__ = ["ReportOptions", "ReportSummary", "build_report"]
