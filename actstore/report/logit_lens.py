"""The logit lens of a feature page: its decoder row read through a checkpoint's unembedding.

A feature page lists the tokens whose logits the feature's decoder row raises and
lowers most, through the final norm and unembedding of a local checkpoint of the
runs the SAE was read from (:func:`actstore.analysis.lens.direction_logits`).
:func:`lens_source` finds that checkpoint, or says why there is no lens (no
decoder, no local checkpoint, an SAE not on the residual stream), and gives a key
that stands for the lens rows, so an unchanged page is recognised without loading
the model; :func:`lens_rows` loads the model (once per checkpoint) and reads them.

Example
-------
>>> path, note, key = lens_source(st, ref, W_FD, None)  # doctest: +SKIP
>>> lens, note = lens_rows({}, path, W_FD[ref.feature])  # doctest: +SKIP
>>> lens["rows"][0]  # doctest: +SKIP
[0, 'white', 0.3132..., 'I', -0.7069...]
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from actstore.errors import InputError

if TYPE_CHECKING:
    from actstore.report.features import FeatureRef
    from actstore.store.store import Store


def lens_source(
    store: Store, ref: FeatureRef, decoder: np.ndarray | None, why_not: str | None
) -> tuple[str | None, str | None, Any]:
    """(checkpoint path, None) for the logit lens of a feature, or (None, why not); and a key.

    The key (SAE and checkpoint weights hashes, the feature) stands for the lens
    rows, so an unchanged page is recognised without loading the model.

    Parameters
    ----------
    store
        The store the report is built from.
    ref
        The feature; the checkpoint of its run (``ref.run``) is preferred.
    decoder
        The SAE's decoder rows (F, D), or None where they cannot be read.
    why_not
        Why there is no decoder (shown on the page), where ``decoder`` is None.

    Returns
    -------
    tuple
        ``(path, None, key)`` where a lens can be read, else ``(None, note, None)``.

    Example
    -------
    >>> lens_source(None, None, None, "the SAE file is missing")
    (None, 'no decoder: the SAE file is missing', None)
    """
    if decoder is None:
        return None, f"no decoder: {why_not}", None
    got = store.sql(
        """SELECT c.path, c.weights_hash, s.hook, s.weights_hash FROM feature_files f
           JOIN runs r USING (run_id) JOIN checkpoints c USING (checkpoint_id)
           JOIN saes s ON s.sae_id = f.sae_id
           WHERE f.sae_id = ? AND r.edit_id IS NULL
           ORDER BY r.name IS DISTINCT FROM ?, r.run_id LIMIT 1""",
        [ref.sae_id, ref.run],
    ).fetchall()
    if not got or not got[0][0] or not Path(got[0][0]).exists():
        return None, "no local checkpoint recorded for the runs of this SAE", None
    path, ckpt_hash, hook, sae_hash = got[0]
    if "resid" not in str(hook):
        note = f"{hook} is not the residual stream; the logit lens reads residual directions"
        return None, note, None
    return str(path), None, [str(path), ckpt_hash, sae_hash, ref.feature]


def lens_rows(cache: dict[str, Any], path: str, row_D: np.ndarray) -> tuple[Any, str | None]:
    """The top and bottom tokens of a decoder row through a checkpoint's unembedding.

    Parameters
    ----------
    cache
        Models already loaded in this build, by path (filled in here).
    path
        A local Hugging Face checkpoint.
    row_D
        The decoder row (D,).

    Returns
    -------
    tuple
        ``({"model": path, "rows": [[rank, top token, logit, bottom token, logit], ...]}, None)``
        with ten rows, or ``(None, why not)`` where the model has no unembedding to read.
        Tokens are ``"id N"`` where the checkpoint has no tokenizer.

    Example
    -------
    >>> import tempfile
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> path = tempfile.mkdtemp()
    >>> config = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11, bos_token_id=0, eos_token_id=0)
    >>> GPT2LMHeadModel(config).save_pretrained(path)
    >>> cache = {}
    >>> row_D = np.random.default_rng(0).standard_normal(8).astype(np.float32)
    >>> lens, note = lens_rows(cache, path, row_D)
    >>> len(lens["rows"]), path in cache, note
    (10, True, None)
    """
    from actstore.analysis.lens import _load_model, _load_tokenizer, _vocab, direction_logits

    if path not in cache:
        model, _ = _load_model(path)
        config: Any = model.config
        cache[path] = (model, _vocab(_load_tokenizer(None, path), int(config.vocab_size)))
    model, vocab = cache[path]
    try:
        logits = direction_logits(model, row_D[None, :])[0]
    except InputError as e:
        return None, str(e)
    top = np.argsort(-logits, kind="stable")[:10]
    bottom = np.argsort(logits, kind="stable")[:10]
    tok = (lambda i: vocab[i]) if vocab else (lambda i: f"id {i}")
    rows = [
        [i, tok(int(t)), float(logits[t]), tok(int(b)), float(logits[b])]
        for i, (t, b) in enumerate(zip(top, bottom, strict=True))
    ]
    return {"model": path, "rows": rows}, None
