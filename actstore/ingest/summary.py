"""What an ingest job did: one :class:`RunSummary` per run, an :class:`IngestSummary` per job.

``str()`` of an :class:`IngestSummary` is the table ``actstore ingest`` prints.

Example
-------
>>> print(IngestSummary("runs/s", [RunSummary("base/p", "ingested", 2, 9, 9, 1024, 0.1)]))
run     status    prompts  tokens  rows  MB  seconds
------  --------  -------  ------  ----  --  -------
base/p  ingested        2       9     9   0      0.1
store runs/s: 1 runs in 0.0 s
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

__all__ = ["IngestSummary", "RunSummary"]


@dataclass
class RunSummary:
    """What one run of a job did."""

    name: str
    status: str
    prompts: int
    tokens: int
    rows: int
    bytes: int
    seconds: float


@dataclass
class IngestSummary:
    """What a job did, run by run. ``str()`` is the end-of-job table.

    Example
    -------
    >>> print(run_job("job.toml", quiet=True))  # doctest: +SKIP
    """

    store: str
    runs: list[RunSummary] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    """Decisions worth knowing, e.g. a label column that mixes numbers and text (VARCHAR)."""

    def __str__(self) -> str:
        from actstore.store.render import render_table

        t = pa.table(
            {
                "run": [r.name for r in self.runs],
                "status": [r.status for r in self.runs],
                "prompts": [r.prompts for r in self.runs],
                "tokens": [r.tokens for r in self.runs],
                "rows": [r.rows for r in self.runs],
                "MB": [round(r.bytes / 1e6, 2) for r in self.runs],
                "seconds": [round(r.seconds, 1) for r in self.runs],
            }
        )
        notes = "".join(f"\nnote: {n}" for n in self.notes)
        return (
            f"{render_table(t)}\nstore {self.store}: {len(self.runs)} runs in {self.seconds:.1f} s"
            + notes
        )
