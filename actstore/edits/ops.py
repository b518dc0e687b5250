"""Edit op kinds: a small registry of what an op can do to a hook's activations.

Each kind is an :class:`EditKind`: the fields its ``[[ops]]`` table takes, the
checks on them (run when an :class:`~actstore.edits.spec.EditOp` is built), and
``resolve``, which looks the op's names up (:class:`~actstore.edits.resolve.Lookup`)
and returns a :class:`ResolvedOp` whose ``apply(x_ND, sites) -> x_ND`` maps the
selected activations to their replacements (float32 in and out). The kinds:

``ablate_direction``
    ``x - (x . u) u`` with ``u`` the unit direction (directional ablation).
``steer``
    ``x + alpha v`` (Contrastive Activation Addition: ``v`` as stored unless
    ``normalize``).
``ablate_subspace`` / ``project_subspace``
    with ``Q`` an orthonormal basis (QR) of the given directions: remove their
    span, ``x - Q Q^T x``, or keep only it, ``Q Q^T x`` (e.g. the top principal
    components).
``ablate_features`` / ``clamp_features`` / ``keep_features``
    SAE edits keeping the SAE's error term: ``x' = decode(f') + (x - decode(f))``
    with ``f = encode(x)`` and ``f'`` = ``f`` with the listed features set to 0,
    set to ``value``, or every other feature set to 0.
``patch``
    replace the activations by those ``source_run`` stored for the same prompt
    and position (activation patching across runs, e.g. across checkpoints).
    Prompt tokens must match the source's; at completion positions the source's
    own completion is used, so ``positions = "prompt"`` is the usual choice.

New kinds subclass :class:`EditKind` and are added with :func:`register`; the
shared tests in ``tests/edits/test_kinds.py`` run on every registered kind.

Shapes: ``N`` selected sites, ``D`` hook width, ``K`` directions, ``F`` SAE features.

Example
-------
>>> sorted(KINDS)[:3]
['ablate_direction', 'ablate_features', 'ablate_subspace']
>>> get_kind("steer").fields()
('direction', 'file', 'alpha', 'normalize')
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from actstore.edits.positions import Sites
from actstore.errors import InputError, SpecError

if TYPE_CHECKING:
    from actstore.edits.resolve import Lookup
    from actstore.edits.spec import EditOp
    from actstore.ingest.saes import LoadedSAE

__all__ = ["KINDS", "EditKind", "ResolvedOp", "get_kind", "register"]

ApplyFn = Callable[[torch.Tensor, Sites], torch.Tensor]
"""``apply(x_ND, sites) -> new_ND``: float32 activations at the selected sites -> replacements."""


@dataclass(frozen=True)
class ResolvedOp:
    """An op with its names looked up: ready to apply at its hook.

    Example
    -------
    >>> op = ResolvedOp("steer", "blocks.0.hook_resid_post", "all", 4,
    ...                 lambda x_ND, sites: x_ND + 1, "v")
    >>> op.apply(torch.zeros(2, 4), None).sum().item()
    8.0
    """

    kind: str
    hook: str
    """The hook it changes."""
    positions: str
    """Which tokens it changes (see :mod:`actstore.edits.positions`)."""
    d: int
    """The width it expects at ``hook``."""
    apply: ApplyFn
    fingerprint: str
    """Identifies the content used (vector hashes, SAE weights hash, source run)."""


class _Cached:
    """Float32 tensors kept per device, so a vector is copied to a GPU once."""

    def __init__(self, **arrays: np.ndarray) -> None:
        self._cpu = {k: torch.as_tensor(np.asarray(v, np.float32)) for k, v in arrays.items()}
        self._on: dict[tuple[str, str], torch.Tensor] = {}

    def __call__(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, str(device))
        if key not in self._on:
            self._on[key] = self._cpu[name].to(device)
        return self._on[key]


class EditKind(ABC):
    """An op kind: its fields, checks and how it resolves. Subclass and :func:`register`.

    Example
    -------
    >>> get_kind("patch").summary
    'replace activations by those a source run stored for the same prompt and position'
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    sources: ClassVar[tuple[str, ...]] = ()
    """Fields of which exactly one must be given (what to apply)."""
    required: ClassVar[tuple[str, ...]] = ()
    """Fields that must be given."""
    optional: ClassVar[tuple[str, ...]] = ()
    """Fields that may be given."""
    hook_from: ClassVar[tuple[str, ...]] = ()
    """Fields naming an object whose recorded hook is the default ``hook``."""

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        """The op fields this kind takes besides ``kind``, ``hook`` and ``positions``.

        Example
        -------
        >>> get_kind("clamp_features").fields()
        ('sae', 'sae_path', 'features', 'value')
        """
        return (*cls.sources, *cls.required, *cls.optional)

    def check(self, op: EditOp, where: str) -> None:
        """Raise :class:`SpecError` unless the op's fields fit this kind (no store needed).

        Example
        -------
        >>> get_kind("steer").check(EditOp(kind="steer", hook="h", file="v.npy"), "op")  # doctest: +SKIP
        """
        if self.sources:
            given = [f for f in self.sources if getattr(op, f) is not None]
            if len(given) != 1:
                raise SpecError(
                    f"{where}: give exactly one of {' or '.join(self.sources)}, "
                    f"not {'both' if given else 'neither'}"
                )
        missing = [f for f in self.required if getattr(op, f) is None]
        if missing:
            raise SpecError(f"{where}: {self.name} needs `{missing[0]}`")
        if op.hook is None and not any(getattr(op, f) is not None for f in self.hook_from):
            source = " (or name a " + " / ".join(self.hook_from) + ")" if self.hook_from else ""
            raise SpecError(f"{where}: {self.name} needs `hook`{source}")

    @abstractmethod
    def resolve(self, op: EditOp, lookup: Lookup) -> ResolvedOp:
        """Look the op's names up and return the op ready to apply (each kind defines it).

        Example
        -------
        >>> rop = get_kind("steer").resolve(op, Lookup(st))  # doctest: +SKIP
        """


KINDS: dict[str, EditKind] = {}
"""Kind name -> :class:`EditKind`, in registration order."""


def register(kind: type[EditKind]) -> type[EditKind]:
    """Add a kind to :data:`KINDS` (a class decorator).

    Example
    -------
    >>> @register
    ... class Noop(EditKind):
    ...     name, summary, required = "noop", "change nothing", ()
    ...     def resolve(self, op, lookup):
    ...         return ResolvedOp("noop", op.hook, op.positions, 0, lambda x, s: x, "")
    >>> "noop" in KINDS
    True
    >>> _ = KINDS.pop("noop")
    """
    KINDS[kind.name] = kind()
    return kind


def get_kind(name: str) -> EditKind:
    """The registered kind ``name``; a SpecError lists the kinds otherwise.

    Example
    -------
    >>> get_kind("ablate")
    Traceback (most recent call last):
    ...
    actstore.errors.SpecError: op kind 'ablate' is not one of ablate_direction, steer, ablate_subspace, project_subspace, ablate_features, clamp_features, keep_features, patch
    """
    try:
        return KINDS[name]
    except (KeyError, TypeError):
        raise SpecError(f"op kind {name!r} is not one of {', '.join(KINDS)}") from None


def _where(op: EditOp) -> str:
    return f"op {op.kind} at {op.hook!r}" if op.hook else f"op {op.kind}"


def _hook(op: EditOp, recorded: str, what: str) -> str:
    if op.hook:
        return op.hook
    if not recorded:
        raise InputError(f"{_where(op)}: {what} records no hook; set `hook` in the op")
    return recorded


def _vector(op: EditOp, lookup: Lookup) -> tuple[np.ndarray, str, str]:
    """The op's one vector ``(vec_D, hook, fingerprint)`` from ``direction`` or ``file``."""
    if op.direction is not None:
        vec, recorded, fp = lookup.direction(op.direction)
        return vec, _hook(op, recorded, f"direction {op.direction!r}"), fp
    assert op.file is not None
    mat, fp = lookup.matrix_file(op.file)
    if mat.shape[0] != 1:
        raise InputError(
            f"{_where(op)}: file {op.file!r} holds a {mat.shape} matrix; {op.kind} takes one "
            "(D,) vector (use ablate_subspace / project_subspace for several)"
        )
    return mat[0], _hook(op, "", f"file {op.file!r}"), fp


@register
class AblateDirection(EditKind):
    """``x - (x . u) u``: remove the component along a unit direction."""

    name = "ablate_direction"
    summary = "remove the component along a direction: x - (x.u)u, u normalised"
    sources = ("direction", "file")
    hook_from = ("direction",)

    def resolve(self, op: EditOp, lookup: Lookup) -> ResolvedOp:
        vec, hook, fp = _vector(op, lookup)
        norm = float(np.linalg.norm(vec))
        if norm == 0:
            raise InputError(f"{_where(op)}: the direction is zero; it has no component to remove")
        cached = _Cached(u_D=vec / norm)

        def apply(x_ND: torch.Tensor, sites: Sites) -> torch.Tensor:
            u_D = cached("u_D", x_ND.device)
            return x_ND - (x_ND @ u_D)[:, None] * u_D

        return ResolvedOp(self.name, hook, op.positions, vec.size, apply, fp)


@register
class Steer(EditKind):
    """``x + alpha v``: add a steering vector (CAA)."""

    name = "steer"
    summary = "add alpha * v (v as stored, or unit norm with normalize = true)"
    sources = ("direction", "file")
    optional = ("alpha", "normalize")
    hook_from = ("direction",)

    def resolve(self, op: EditOp, lookup: Lookup) -> ResolvedOp:
        vec, hook, fp = _vector(op, lookup)
        if op.normalize:
            norm = float(np.linalg.norm(vec))
            if norm == 0:
                raise InputError(f"{_where(op)}: the vector is zero and cannot be normalised")
            vec = vec / norm
        alpha = 1.0 if op.alpha is None else float(op.alpha)
        cached = _Cached(delta_D=alpha * vec)

        def apply(x_ND: torch.Tensor, sites: Sites) -> torch.Tensor:
            return x_ND + cached("delta_D", x_ND.device)

        return ResolvedOp(self.name, hook, op.positions, vec.size, apply, fp)


class _Subspace(EditKind):
    sources = ("directions", "file")
    hook_from = ("directions",)
    keep: ClassVar[bool]

    def resolve(self, op: EditOp, lookup: Lookup) -> ResolvedOp:
        if op.directions is not None:
            if not op.directions:
                raise InputError(f"{_where(op)}: `directions` is empty; name at least one")
            found = [lookup.direction(n) for n in op.directions]
            widths = {v.size for v, _, _ in found}
            if len(widths) > 1:
                raise InputError(
                    f"{_where(op)}: directions {list(op.directions)} have different widths "
                    f"{sorted(widths)}; they must share one hook"
                )
            hooks = {h for _, h, _ in found if h}
            if op.hook is None and len(hooks) > 1:
                raise InputError(
                    f"{_where(op)}: directions {list(op.directions)} were recorded at hooks "
                    f"{sorted(hooks)}; set `hook` in the op"
                )
            U_KD = np.stack([v for v, _, _ in found])
            hook = _hook(op, next(iter(hooks), ""), f"directions {list(op.directions)}")
            fp = ";".join(f for _, _, f in found)
        else:
            assert op.file is not None
            U_KD, fp = lookup.matrix_file(op.file)
            hook = _hook(op, "", f"file {op.file!r}")
        K, D = U_KD.shape
        if K > D:
            raise InputError(f"{_where(op)}: {K} directions of width {D} span at most {D}")
        Q_DK, R_KK = np.linalg.qr(U_KD.T)
        diag = np.abs(np.diag(R_KK))
        if diag.min() <= 1e-8 * max(diag.max(), 1e-300):
            raise InputError(
                f"{_where(op)}: the {K} directions are linearly dependent (rank < {K}); "
                "drop the redundant ones"
            )
        cached = _Cached(Q_DK=Q_DK)
        keep = self.keep

        def apply(x_ND: torch.Tensor, sites: Sites) -> torch.Tensor:
            Q = cached("Q_DK", x_ND.device)
            inside_ND = (x_ND @ Q) @ Q.T
            return inside_ND if keep else x_ND - inside_ND

        return ResolvedOp(self.name, hook, op.positions, D, apply, fp)


@register
class AblateSubspace(_Subspace):
    """``x - Q Q^T x``: remove the span of several directions."""

    name = "ablate_subspace"
    summary = "remove the span of several directions (orthonormalised with QR)"
    keep = False


@register
class ProjectSubspace(_Subspace):
    """``Q Q^T x``: keep only the span of several directions."""

    name = "project_subspace"
    summary = "keep only the span of several directions, e.g. top principal components"
    keep = True


class _SAEFeatures(EditKind):
    sources = ("sae", "sae_path")
    required: ClassVar[tuple[str, ...]] = ("features",)
    hook_from = ("sae", "sae_path")

    @abstractmethod
    def modify(self, f_NF: torch.Tensor, feats: torch.Tensor, op: EditOp) -> torch.Tensor:
        """The edited features (each SAE kind defines it)."""

    def resolve(self, op: EditOp, lookup: Lookup) -> ResolvedOp:
        loaded: LoadedSAE = (
            lookup.sae(op.sae) if op.sae is not None else lookup.sae_dir(str(op.sae_path))
        )
        feats = list(op.features or ())
        too_big = [f for f in feats if f >= loaded.d_sae]
        if too_big:
            raise InputError(
                f"{_where(op)}: features {too_big} do not exist in SAE {loaded.name!r}, "
                f"which has {loaded.d_sae} (0-{loaded.d_sae - 1})"
            )
        hook = op.hook or loaded.hook
        sae = loaded.sae
        feats_t = torch.as_tensor(feats, dtype=torch.long)
        modify = self.modify

        def apply(x_ND: torch.Tensor, sites: Sites) -> torch.Tensor:
            if next(sae.parameters()).device != x_ND.device:
                sae.to(x_ND.device)
            with torch.no_grad():
                f_NF = sae.encode(x_ND)
                if f_NF.is_sparse:
                    f_NF = f_NF.to_dense()
                new_NF = modify(f_NF, feats_t.to(x_ND.device), op)
                # decode(f') + (x - decode(f)), written so that f' == f gives x exactly
                return x_ND + (sae.decode(new_NF) - sae.decode(f_NF)).to(x_ND.dtype)

        return ResolvedOp(
            self.name, hook, op.positions, loaded.d_in, apply, f"sae {loaded.weights_hash}"
        )


@register
class AblateFeatures(_SAEFeatures):
    """Zero the listed SAE features, keeping the error term."""

    name = "ablate_features"
    summary = "SAE: set the listed features to 0; x' = decode(f') + (x - decode(f))"

    def modify(self, f_NF: torch.Tensor, feats: torch.Tensor, op: EditOp) -> torch.Tensor:
        out = f_NF.clone()
        out[:, feats] = 0
        return out


@register
class ClampFeatures(_SAEFeatures):
    """Set the listed SAE features to ``value``, keeping the error term."""

    name = "clamp_features"
    summary = "SAE: set the listed features to `value`; x' = decode(f') + (x - decode(f))"
    required = ("features", "value")

    def modify(self, f_NF: torch.Tensor, feats: torch.Tensor, op: EditOp) -> torch.Tensor:
        out = f_NF.clone()
        out[:, feats] = float(op.value or 0.0)
        return out


@register
class KeepFeatures(_SAEFeatures):
    """Zero every SAE feature but the listed ones, keeping the error term."""

    name = "keep_features"
    summary = "SAE: set every feature not listed to 0; x' = decode(f') + (x - decode(f))"

    def modify(self, f_NF: torch.Tensor, feats: torch.Tensor, op: EditOp) -> torch.Tensor:
        out = torch.zeros_like(f_NF)
        out[:, feats] = f_NF[:, feats]
        return out


@register
class Patch(EditKind):
    """Replace activations by a source run's, at the same prompt and position."""

    name = "patch"
    summary = "replace activations by those a source run stored for the same prompt and position"
    required = ("source_run",)

    def resolve(self, op: EditOp, lookup: Lookup) -> ResolvedOp:
        assert op.hook is not None and op.source_run is not None
        source = lookup.patch_source(op.source_run, op.hook)

        def apply(x_ND: torch.Tensor, sites: Sites) -> torch.Tensor:
            return source.values(sites).to(device=x_ND.device, dtype=x_ND.dtype)

        return ResolvedOp(self.name, op.hook, op.positions, source.d, apply, source.fingerprint)


def kind_summaries() -> dict[str, Any]:
    """Kind -> (fields, summary), for help texts.

    Example
    -------
    >>> kind_summaries()["steer"]["fields"]
    ['direction', 'file', 'alpha', 'normalize']
    """
    return {n: {"fields": list(k.fields()), "summary": k.summary} for n, k in KINDS.items()}
