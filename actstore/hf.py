"""Quiet Hugging Face loaders: actstore shows its own progress, not theirs.

transformers draws a "Loading weights" bar on every ``from_pretrained`` and a
"Writing model shards" bar on ``save_pretrained``, and huggingface_hub one per
download; in a command's output they are noise between actstore's own lines.
:func:`no_hf_progress` turns them off for a block (and restores them); the CLI
turns them off for the whole command (:func:`disable_hf_progress`).

Example
-------
>>> with no_hf_progress():
...     pass  # AutoModelForCausalLM.from_pretrained(path) here draws no bar
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["disable_hf_progress", "no_hf_progress"]


def disable_hf_progress() -> None:
    """Turn transformers' and huggingface_hub's progress bars off for this process.

    Example
    -------
    >>> disable_hf_progress()
    """
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_progress_bars()


@contextmanager
def no_hf_progress() -> Iterator[None]:
    """Turn the bars off inside the block, and back on after it if they were on.

    Example
    -------
    >>> from transformers.utils import logging as hf_logging
    >>> with no_hf_progress():
    ...     hf_logging.is_progress_bar_enabled()
    False
    """
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )
    from transformers.utils import logging as hf_logging

    tf_on, hub_on = hf_logging.is_progress_bar_enabled(), not are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    try:
        yield
    finally:
        if tf_on:
            hf_logging.enable_progress_bar()
        if hub_on:
            enable_progress_bars()
