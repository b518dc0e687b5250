"""What an edit's names mean: directions, SAEs and runs in a store, and files on disk.

An :class:`~actstore.edits.spec.EditSpec` names things; :class:`Lookup` finds
them, once each, with errors that list what the store has: a direction in the
``directions`` table, a ``.npy`` file, an SAE in the ``saes`` table (loaded from
its recorded source and checked against its recorded weights hash) or a sae_lens
directory, and the stored activations of a run to patch from
(:class:`PatchSource`). Each thing comes with a fingerprint of its content, so an
edit whose direction was replaced is a different edit.

Shapes: ``D`` hook width, ``K`` directions, ``N`` sites.

Example
-------
>>> lookup = Lookup(st)  # doctest: +SKIP
>>> vec_D, hook = lookup.direction("trigger_l2")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from actstore.edits.positions import Sites
from actstore.errors import InputError, NotFoundError

if TYPE_CHECKING:
    from actstore.ingest.saes import LoadedSAE
    from actstore.store.store import Store

__all__ = ["Lookup", "PatchSource"]


def _hash_array(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, np.float64).tobytes()).hexdigest()[:16]


class PatchSource:
    """The stored activations of one (run, hook), fetched a batch of prompts at a time.

    Example
    -------
    >>> src = Lookup(st).patch_source("ft/pairs", "blocks.1.hook_resid_post")  # doctest: +SKIP
    >>> values_ND = src.values(sites)  # doctest: +SKIP
    """

    def __init__(self, store: Store, run: str, hook: str) -> None:
        info = store.array_info(run, hook)  # RunNotFoundError / HookNotFoundError list names
        rec = store.catalog.read(
            "SELECT run_id, name, prompt_set_id, job_hash, status FROM runs WHERE run_id = ?",
            [int(info["run_id"])],
        ).to_pylist()[0]
        self.store = store
        self.run = str(rec["name"])
        self.run_id = int(rec["run_id"])
        self.prompt_set_id = rec["prompt_set_id"]
        self.hook = hook
        self.d = int(info["d"])
        self.fingerprint = f"run{self.run_id}:{rec['job_hash']}:{info['n_rows']}"
        self._prompts: frozenset[int] = frozenset()
        self._index: dict[tuple[int, int], int] = {}
        self._tokens_N = np.zeros(0, np.int64)
        self._values_ND = torch.zeros(0, self.d)

    def _fetch(self, prompts: tuple[int, ...]) -> None:
        acts = self.store.acts(
            self.run_id,
            self.hook,
            where="list_contains($prompts, prompt_idx)",
            params={"prompts": list(prompts)},
        )
        meta = acts.meta
        idx = meta.column("prompt_idx").to_pylist()
        pos = meta.column("position").to_pylist()
        self._index = {(int(i), int(p)): n for n, (i, p) in enumerate(zip(idx, pos, strict=True))}
        self._tokens_N = np.asarray(meta.column("token_id").to_pylist(), np.int64)
        self._values_ND = torch.from_numpy(acts.numpy(np.float32))
        self._prompts = frozenset(prompts)

    def values(self, sites: Sites) -> torch.Tensor:
        """The source run's stored activations at ``sites`` (same prompt, same position), float32.

        At prompt tokens the source must hold the same token (same prompt set and
        tokenizer); at completion tokens it holds its own completion, which may differ.

        Raises
        ------
        InputError
            If the source run stores no activation at a site, or holds another
            token at a prompt position (another prompt set or tokenizer).

        Example
        -------
        >>> values_ND = src.values(step.select("prompt"))  # doctest: +SKIP
        """
        if not set(sites.batch_prompts) <= self._prompts:
            self._fetch(sites.batch_prompts)
        prompt_idx = sites.prompt_idx_N.tolist()
        position = sites.position_N.tolist()
        rows = []
        for i, p in zip(prompt_idx, position, strict=True):
            row = self._index.get((int(i), int(p)))
            if row is None:
                raise InputError(
                    f"patch from run {self.run!r}: it stores no {self.hook!r} activation for "
                    f"prompt {i} position {p}; patch positions the source stored (ingest it with "
                    'positions = "all", or choose positions = "prompt" or "last")'
                )
            rows.append(row)
        rows_N = np.asarray(rows, np.int64)
        if sites.token_id_N is not None and rows_N.size:
            want = sites.token_id_N.cpu().numpy()
            have = self._tokens_N[rows_N]
            bad = np.flatnonzero((want != have) & sites.in_prompt_N.cpu().numpy())
            if bad.size:
                k = int(bad[0])
                raise InputError(
                    f"patch from run {self.run!r}: prompt {prompt_idx[k]} position {position[k]} "
                    f"is token {int(have[k])} there but {int(want[k])} here; patch between runs of "
                    "the same prompt set and tokenizer"
                )
        return self._values_ND[torch.from_numpy(rows_N)]


class Lookup:
    """Resolves the names an edit uses, against ``store`` (which may be None for file-only edits).

    Example
    -------
    >>> Lookup(None).direction("x")
    Traceback (most recent call last):
    ...
    actstore.errors.InputError: direction 'x' names a catalog object, but no store was given; apply the edit with a store
    """

    def __init__(self, store: Store | None) -> None:
        self.store = store
        self._saes: dict[str, LoadedSAE] = {}

    def _need_store(self, what: str) -> Store:
        if self.store is None:
            raise InputError(
                f"{what} names a catalog object, but no store was given; apply the edit with a store"
            )
        return self.store

    def direction(self, name: str) -> tuple[np.ndarray, str, str]:
        """A stored direction: ``(vec_D, hook, fingerprint)``; NotFoundError lists the stored ones.

        Example
        -------
        >>> vec_D, hook, _ = Lookup(st).direction("trigger_l2")  # doctest: +SKIP
        """
        from actstore.store.objects import get_direction

        store = self._need_store(f"direction {name!r}")
        vec, rec = get_direction(store, name)
        if vec.size == 0 or not np.isfinite(vec).all():
            raise InputError(f"direction {name!r} is empty or not finite; store it again")
        return vec, str(rec.get("hook") or ""), f"direction {name}:{_hash_array(vec)}"

    def matrix_file(self, path: str) -> tuple[np.ndarray, str]:
        """A ``.npy`` file as a ``(K, D)`` float64 matrix (a vector is ``K = 1``) and a fingerprint.

        Example
        -------
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "v.npy"); np.save(p, np.ones(4))
        >>> Lookup(None).matrix_file(p)[0].shape
        (1, 4)
        """
        p = Path(path)
        if not p.is_file():
            raise InputError(f"edit file {str(p)!r} does not exist; give the path of a .npy file")
        try:
            a = np.load(p, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise InputError(
                f"edit file {str(p)!r} is not a .npy array ({e}); save it with numpy.save"
            ) from None
        if a.dtype.kind not in "fiu" or a.ndim not in (1, 2) or a.size == 0:
            raise InputError(
                f"edit file {str(p)!r} holds a {a.dtype} array of shape {a.shape}; it must be a "
                "non-empty (D,) vector or (K, D) matrix of numbers"
            )
        a = np.atleast_2d(a.astype(np.float64))
        if not np.isfinite(a).all():
            raise InputError(f"edit file {str(p)!r} has NaN or infinite values")
        return a, f"file {p.name}:{_hash_array(a)}"

    def sae(self, name: str) -> LoadedSAE:
        """An SAE of the store's ``saes`` table, loaded on CPU from its recorded source.

        Raises
        ------
        NotFoundError
            If no SAE has that name (the message lists them).
        InputError
            If its source is gone or its weights changed since it was recorded.

        Example
        -------
        >>> sae = Lookup(st).sae("l2_resid")  # doctest: +SKIP
        """
        from actstore.ingest.saes import SAESpec, load_sae

        if name in self._saes:
            return self._saes[name]
        store = self._need_store(f"SAE {name!r}")
        rows = store.catalog.read(
            "SELECT name, source, hook, weights_hash FROM saes ORDER BY sae_id"
        ).to_pylist()
        rec = next((r for r in rows if r["name"] == name), None)
        if rec is None:
            raise NotFoundError(
                f"SAE {name!r} not in the store; stored SAEs: {[r['name'] for r in rows]} "
                "(or give sae_path = a sae_lens directory)"
            )
        source = str(rec["source"])
        if Path(source).is_dir():
            spec = SAESpec(path=source, name=name, hook=rec["hook"] or None)
        elif Path(source).is_absolute() or "/" not in source:
            raise InputError(
                f"SAE {name!r} was loaded from {source!r}, which is no longer there; restore it "
                "or give sae_path = its new directory"
            )
        else:
            release, sae_id = source.split("/", 1)
            spec = SAESpec(release=release, sae_id=sae_id, name=name, hook=rec["hook"] or None)
        loaded = load_sae(spec, "cpu")
        if rec["weights_hash"] and loaded.weights_hash != rec["weights_hash"]:
            raise InputError(
                f"SAE {name!r} at {source!r} has other weights than when it was recorded; "
                "its stored features no longer match it: restore it, or give sae_path to use it anyway"
            )
        self._saes[name] = loaded
        return loaded

    def sae_dir(self, path: str) -> LoadedSAE:
        """An SAE from a sae_lens directory, loaded on CPU.

        Example
        -------
        >>> sae = Lookup(None).sae_dir("saes/l2_resid")  # doctest: +SKIP
        """
        from actstore.ingest.saes import SAESpec, load_sae

        key = f"path:{path}"
        if key not in self._saes:
            self._saes[key] = load_sae(SAESpec(path=path), "cpu")
        return self._saes[key]

    def patch_source(self, run: str, hook: str) -> PatchSource:
        """The stored activations of ``run`` at ``hook`` (errors list runs and hooks).

        Example
        -------
        >>> src = Lookup(st).patch_source("ft/pairs", "blocks.1.hook_resid_post")  # doctest: +SKIP
        """
        return PatchSource(self._need_store(f"source_run {run!r}"), run, hook)
