"""The one exception root of actstore and its subclasses.

Every error a user can cause is an :class:`ActstoreError`. Each subclass also
inherits the builtin exception that fits, so ``except KeyError`` still works for
code that does not know actstore. Messages name the object at fault and say what
to do next.

Example
-------
>>> from actstore.errors import HookNotFoundError
>>> try:
...     raise HookNotFoundError("hook 'x' not in run 'r'; see `actstore info STORE`")
... except KeyError as e:
...     print(type(e).__name__)
HookNotFoundError
"""

from __future__ import annotations


class ActstoreError(Exception):
    """Root of every error actstore raises on purpose."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0]) if self.args else ""


class NotAStoreError(ActstoreError, FileNotFoundError):
    """A path is not an actstore store (or is a file where a directory is needed)."""


class FormatVersionError(ActstoreError, ValueError):
    """A store was written by a format this version of actstore cannot read."""


class RunNotFoundError(ActstoreError, KeyError):
    """A run name or id is not in the catalog."""


class HookNotFoundError(ActstoreError, KeyError):
    """A hook is not in a run, or not a hook point of a model."""


class NotFoundError(ActstoreError, KeyError):
    """A named catalog object (SAE, direction, prompt set, query...) does not exist."""


class CorruptChunkError(ActstoreError, OSError):
    """A stored chunk failed its checksum or could not be decoded."""


class StoreLockedError(ActstoreError, TimeoutError):
    """The catalog stayed locked by another process for too long."""


class SpecError(ActstoreError, ValueError):
    """A job, edit or analysis spec is malformed (unknown key, bad value)."""


class InputError(ActstoreError, ValueError):
    """User input (a prompt file, a parameter, a model) is unusable as given."""


class ReadOnlyError(ActstoreError, PermissionError):
    """A write was attempted on a store opened read-only."""


class ConcurrentWriteError(ActstoreError, RuntimeError):
    """Another writer committed to the same (remote) store at the same time."""
