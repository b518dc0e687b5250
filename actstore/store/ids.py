"""Integer ids as users hold them: Python ints and numpy integers alike.

A run, SAE or analysis id read from a DataFrame (``df.run_id[0]``) is a numpy
integer, not a Python ``int``; every function that takes "a name or an id"
resolves ids through :func:`as_id`, so both work.

Example
-------
>>> import numpy as np
>>> as_id(np.int64(3)), as_id(3), as_id("3"), as_id(True)
(3, 3, None, None)
"""

from __future__ import annotations

import numbers
from typing import Any

__all__ = ["as_id"]


def as_id(value: Any) -> int | None:
    """``value`` as an ``int`` if it is an integer (Python or numpy, not bool), else None.

    Example
    -------
    >>> import numpy as np
    >>> as_id(np.uint32(7))
    7
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)
