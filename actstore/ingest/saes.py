"""Sparse autoencoders (SAEs) in an ingest: loading them and encoding activations sparsely.

An ingest job may name SAEs (``[[saes]]`` tables of the job TOML); each reads one
hook the job captures and turns its activations into feature activations, which
are mostly zero. actstore stores only the nonzeros, as ``(row, feature, value)``
triples (see ``docs/FORMAT.md``).

- :class:`SAESpec` says where an SAE comes from: a directory written by sae_lens
  (``SAE.save_model`` / ``save_inference_model``) or a sae_lens pretrained
  ``release`` and ``sae_id`` (downloaded from the Hugging Face hub).
- :func:`load_sae` loads it with sae_lens, in float32, and returns a
  :class:`LoadedSAE`: the sae_lens object plus the identity the catalog records
  (``saes`` table: name, source, hook, layer, widths, architecture, weights hash,
  config).
- :func:`check_sae` checks, before any model runs, that the SAE's hook is
  captured and that its input width matches.
- :func:`encode_sparse` runs the SAE's own ``encode`` on ``(N, D)`` activations,
  block by block so that the dense ``(rows, d_sae)`` intermediate stays small,
  and returns the nonzeros.

Shapes: ``N`` rows (tokens), ``D`` the hook's width (``d_in``), ``F`` SAE
features (``d_sae``), ``B`` rows in one encoding block.

Example
-------
>>> spec = SAESpec.from_dict({"path": "saes/l2_resid"})
>>> spec.name
'l2_resid'
>>> sae = load_sae(spec, "cpu")  # doctest: +SKIP
>>> check_sae(sae, ["blocks.2.hook_resid_post"], {"blocks.2.hook_resid_post": 64})  # doctest: +SKIP
>>> rows, feats, vals = encode_sparse(sae, acts_ND)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from actstore import spec as _spec
from actstore.errors import HookNotFoundError, InputError, SpecError

__all__ = [
    "LoadedSAE",
    "SAESpec",
    "check_sae",
    "encode_sparse",
    "load_sae",
    "weights_hash",
]

_LAYER_RE = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_BLOCK_BYTES = 64 * 2**20
"""Default budget for one dense ``(B, F)`` float32 block in :func:`encode_sparse`."""


@dataclass(frozen=True, slots=True)
class SAESpec:
    """Where one SAE comes from: a ``[[saes]]`` table of an ingest job.

    Give either ``path`` or both ``release`` and ``sae_id``.

    Example
    -------
    >>> SAESpec(release="gpt2-small-res-jb", sae_id="blocks.8.hook_resid_pre").name
    'gpt2-small-res-jb/blocks.8.hook_resid_pre'
    >>> SAESpec.from_dict({"path": "x", "layer": 3})
    Traceback (most recent call last):
    ...
    actstore.errors.SpecError: [[saes]]: unknown key 'layer'; valid keys: path, release, sae_id, name, hook
    """

    path: str | None = None
    """A directory saved by sae_lens (``cfg.json`` and ``sae_weights.safetensors``)."""
    release: str | None = None
    """A sae_lens pretrained release (``SAE.from_pretrained(release, sae_id)``); needs a network."""
    sae_id: str | None = None
    """The SAE's id within ``release``."""
    name: str | None = None
    """Its unique name in the store; default: the directory's name, or ``release/sae_id``."""
    hook: str | None = None
    """Hook it reads, overriding the ``hook_name`` in its sae_lens metadata."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and (not isinstance(value, str) or not value):
                raise SpecError(f"[[saes]]: {f.name} must be a non-empty string, got {value!r}")
        if (self.path is None) == (self.release is None):
            raise SpecError(
                "[[saes]]: give either `path` (a directory saved by sae_lens) or `release` "
                f"and `sae_id` (a sae_lens pretrained SAE), not {'both' if self.path else 'neither'}"
            )
        if (self.release is None) != (self.sae_id is None):
            raise SpecError(
                "[[saes]]: `release` and `sae_id` go together; "
                f"got release={self.release!r}, sae_id={self.sae_id!r}"
            )
        if self.name is None:
            if self.path is not None:
                default = Path(self.path).resolve().name or self.path
            else:
                default = f"{self.release}/{self.sae_id}"
            object.__setattr__(self, "name", default)

    @property
    def source(self) -> str:
        """Where it is loaded from: the absolute directory, or ``release/sae_id``.

        Example
        -------
        >>> SAESpec(release="r", sae_id="blocks.0.hook_resid_pre").source
        'r/blocks.0.hook_resid_pre'
        """
        if self.path is not None:
            return str(Path(self.path).resolve())
        return f"{self.release}/{self.sae_id}"

    def to_dict(self) -> dict[str, Any]:
        """The set fields as a TOML/JSON-ready dict.

        Example
        -------
        >>> SAESpec(path="d", name="l2").to_dict()
        {'path': 'd', 'name': 'l2'}
        """
        return _spec.to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SAESpec:
        """Build from a ``[[saes]]`` table; unknown keys are an error.

        Example
        -------
        >>> SAESpec.from_dict({"path": "saes/a", "hook": "blocks.1.hook_resid_post"}).hook
        'blocks.1.hook_resid_post'
        """
        return _spec.from_dict(cls, d, where="[[saes]]")


@dataclass(frozen=True, slots=True)
class LoadedSAE:
    """A loaded sae_lens SAE and the identity the catalog records for it.

    Example
    -------
    >>> sae = load_sae(SAESpec(path="saes/l2"), "cpu")  # doctest: +SKIP
    >>> sae.hook, sae.layer, sae.d_in, sae.d_sae  # doctest: +SKIP
    ('blocks.2.hook_resid_post', 2, 64, 256)
    """

    sae: Any
    """The ``sae_lens.SAE`` (float32, in eval mode, on the requested device)."""
    name: str
    """Unique name in the store."""
    source: str
    """The absolute directory it was loaded from, or ``release/sae_id``."""
    hook: str
    """The hook its inputs come from (TransformerLens name)."""
    layer: int | None
    """The layer in ``hook`` (``blocks.{L}.``), or None if it names none."""
    d_in: int
    """Input width; must equal the hook's width."""
    d_sae: int
    """Number of features."""
    architecture: str
    """sae_lens architecture (``standard``, ``topk``, ``jumprelu``, ...)."""
    weights_hash: str
    """:func:`weights_hash` of its state dict."""
    cfg: dict[str, Any]
    """The sae_lens config (``sae.cfg.to_dict()``), JSON-ready."""

    def catalog_record(self) -> dict[str, Any]:
        """Keyword arguments for :func:`actstore.store.objects.add_sae`.

        Example
        -------
        >>> sae_id = objects.add_sae(st, **loaded.catalog_record())  # doctest: +SKIP
        """
        return {
            "name": self.name,
            "hook": self.hook,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "source": self.source,
            "layer": self.layer,
            "architecture": self.architecture,
            "weights_hash": self.weights_hash,
            "config": self.cfg,
        }


def weights_hash(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict: each tensor's name, dtype, shape and bytes, in key order.

    Parameters
    ----------
    state_dict
        Name -> tensor (any dtype, any device).

    Returns
    -------
    str
        The first 32 hex digits.

    Example
    -------
    >>> weights_hash({"w": torch.zeros(2)}) == weights_hash({"w": torch.zeros(2)})
    True
    >>> weights_hash({"w": torch.zeros(2)}) == weights_hash({"w": torch.ones(2)})
    False
    """
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        # A uint8 view gives the raw bytes of every dtype, bfloat16 included.
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _hook_layer(hook: str) -> int | None:
    m = _LAYER_RE.search(hook)
    return int(m.group(1)) if m else None


def load_sae(spec: SAESpec, device: str | torch.device = "cpu") -> LoadedSAE:
    """Load an SAE with sae_lens, in float32, and describe it for the catalog.

    Parameters
    ----------
    spec
        Where it comes from. A ``release``/``sae_id`` is fetched from the hub by
        ``sae_lens.SAE.from_pretrained`` (needs a network the first time).
    device
        Where it runs.

    Returns
    -------
    LoadedSAE

    Raises
    ------
    InputError
        If the directory is not a sae_lens SAE, its architecture is training-only,
        or it names no hook (and ``spec.hook`` is not set).

    Example
    -------
    >>> sae = load_sae(SAESpec(path="saes/l2_resid"), "cpu")  # doctest: +SKIP
    >>> sae.architecture  # doctest: +SKIP
    'standard'
    """
    from sae_lens import SAE
    from sae_lens.registry import SAE_CLASS_REGISTRY

    dev = str(device)
    if spec.path is not None:
        path = Path(spec.path)
        cfg_file = path / "cfg.json"
        if not cfg_file.is_file():
            raise InputError(
                f"SAE {spec.name!r}: {str(path)!r} is not a sae_lens SAE directory (no cfg.json); "
                "save one with `sae.save_model(dir)` or use `release` and `sae_id`"
            )
        arch = json.loads(cfg_file.read_text()).get("architecture", "standard")
        if arch not in SAE_CLASS_REGISTRY:
            raise InputError(
                f"SAE {spec.name!r} in {str(path)!r} has architecture {arch!r}, which sae_lens "
                f"cannot run for inference (inference architectures: {sorted(SAE_CLASS_REGISTRY)}); "
                "save a training SAE with `sae.save_inference_model(dir)`"
            )
        sae = SAE.load_from_disk(path, device=dev, dtype="float32")
    else:
        assert spec.release is not None and spec.sae_id is not None
        sae = SAE.from_pretrained(spec.release, spec.sae_id, device=dev, dtype="float32")
    sae.eval()
    hook = spec.hook or sae.cfg.metadata.hook_name
    if not hook:
        raise InputError(
            f"SAE {spec.name!r}: its sae_lens metadata names no hook (cfg.metadata.hook_name); "
            "set `hook = ...` in its [[saes]] table"
        )
    assert spec.name is not None  # filled in by SAESpec.__post_init__
    return LoadedSAE(
        sae=sae,
        name=spec.name,
        source=spec.source,
        hook=str(hook),
        layer=_hook_layer(str(hook)),
        d_in=int(sae.cfg.d_in),
        d_sae=int(sae.cfg.d_sae),
        architecture=str(sae.cfg.architecture()),
        weights_hash=weights_hash(sae.state_dict()),
        cfg=_jsonable(sae.cfg.to_dict()),
    )


def check_sae(sae: LoadedSAE, hooks: Iterable[str], widths: Mapping[str, int]) -> None:
    """Raise unless the SAE's hook is captured and its width is the SAE's ``d_in``.

    Parameters
    ----------
    sae
        From :func:`load_sae`.
    hooks
        The hooks the job captures.
    widths
        Hook -> width (``D``) in the model being ingested; the width of a hook
        missing here is not checked.

    Raises
    ------
    HookNotFoundError
        If ``sae.hook`` is not among ``hooks``.
    InputError
        If the hook's width differs from ``sae.d_in``.

    Example
    -------
    >>> check_sae(sae, ["blocks.0.hook_resid_post"], {"blocks.0.hook_resid_post": 32})  # doctest: +SKIP
    Traceback (most recent call last):
    ...
    actstore.errors.HookNotFoundError: SAE 'l2' reads hook 'blocks.2.hook_resid_post', ...
    """
    captured = list(hooks)
    if sae.hook not in captured:
        raise HookNotFoundError(
            f"SAE {sae.name!r} reads hook {sae.hook!r}, which this job does not capture "
            f"(it captures {captured}); add {sae.hook!r} to the job's hooks, or set `hook` in "
            "the SAE's [[saes]] table if its metadata names the wrong one"
        )
    width = widths.get(sae.hook)
    if width is not None and int(width) != sae.d_in:
        raise InputError(
            f"SAE {sae.name!r} expects d_in={sae.d_in} but hook {sae.hook!r} has width {width} "
            "in this model; it was trained on another model or hook: check its [[saes]] table"
        )


def encode_sparse(
    sae: LoadedSAE | Any,
    acts_ND: torch.Tensor | np.ndarray,
    *,
    block_rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encode activations with the SAE's own ``encode`` and return the nonzeros.

    Runs under ``torch.inference_mode`` on the SAE's device and dtype (float32
    when loaded by :func:`load_sae`), ``block_rows`` rows at a time, so values
    equal ``sae.encode(acts)`` on the same block of inputs.

    Parameters
    ----------
    sae
        A :class:`LoadedSAE` or a ``sae_lens.SAE``.
    acts_ND
        ``(N, d_in)`` activations (any float dtype, any device; numpy accepted).
    block_rows
        Rows per ``encode`` call; default: as many as keep the dense ``(B, F)``
        block within 64 MiB.

    Returns
    -------
    rows : np.ndarray
        int64, row of each nonzero (0..N-1, local to ``acts_ND``), ascending.
    features : np.ndarray
        int32, its feature index (ascending within a row).
    values : np.ndarray
        float32, its activation.

    Example
    -------
    >>> rows, feats, vals = encode_sparse(sae, torch.randn(8, 64))  # doctest: +SKIP
    >>> dense_NF = np.zeros((8, sae.d_sae), np.float32); dense_NF[rows, feats] = vals  # doctest: +SKIP
    """
    model = sae.sae if isinstance(sae, LoadedSAE) else sae
    acts = torch.from_numpy(np.asarray(acts_ND)) if isinstance(acts_ND, np.ndarray) else acts_ND
    if acts.ndim != 2:
        raise InputError(
            f"encode_sparse needs (N, d_in) activations, got shape {tuple(acts.shape)}"
        )
    d_in, d_sae = int(model.cfg.d_in), int(model.cfg.d_sae)
    if acts.shape[1] != d_in:
        raise InputError(
            f"encode_sparse: activations have width {acts.shape[1]}, the SAE expects d_in={d_in}"
        )
    param = next(model.parameters())
    if block_rows is None:
        block_rows = max(1, _BLOCK_BYTES // (4 * d_sae))
    if block_rows < 1:
        raise InputError(f"encode_sparse: block_rows must be >= 1, got {block_rows}")
    rows: list[np.ndarray] = []
    feats: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    with torch.inference_mode():
        for start in range(0, acts.shape[0], block_rows):
            x_BD = acts[start : start + block_rows].to(device=param.device, dtype=param.dtype)
            f_BF = model.encode(x_BD)
            if f_BF.is_sparse:  # TopK with use_sparse_activations
                f_BF = f_BF.to_dense()
            r, c = torch.nonzero(f_BF, as_tuple=True)
            rows.append((r + start).cpu().numpy().astype(np.int64, copy=False))
            feats.append(c.cpu().numpy().astype(np.int32))
            vals.append(f_BF[r, c].float().cpu().numpy())
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32)
    return np.concatenate(rows), np.concatenate(feats), np.concatenate(vals)
