"""A writer killed while a shard streams leaves a temporary file that recovery removes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa

import actstore
from actstore.store import objects

# 8-row chunks of a width-64 float16 array (1024 bytes), 4 chunks (32 rows) a shard; the
# writer commits 30 rows (the partial shard written beside its stream), appends 30 more
# uncommitted (shard 0 fills and is renamed into place; 28 rows of shard 1, 3 chunks, stream
# to its temporary file) and is killed.
WRITER = textwrap.dedent(
    """
    import os, signal, numpy as np
    import actstore
    from actstore.store import arrays
    arrays.TARGET_CHUNK_BYTES, arrays.CHUNKS_PER_SHARD = 1024, 4
    st = actstore.open({root!r})
    w = st.writer("r")
    for b in range(2):
        rows = np.arange(b * 30, (b + 1) * 30)
        w.append(arrays={{"h": np.repeat(rows[:, None].astype(np.float32), 64, axis=1)}},
                 tokens={{"prompt_idx": np.full(30, b), "row": np.arange(30)}},
                 first_prompt=b, n_prompts=1)
        if b == 0:
            w.flush()
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_killed_stream_leaves_a_temporary_that_recovery_removes(tmp_path):
    st = actstore.open(tmp_path / "s", create=True)
    ps = objects.add_prompt_set(st, name="p", table=pa.table({"text": ["a", "b"]}))
    from actstore.store import arrays

    old = arrays.TARGET_CHUNK_BYTES, arrays.CHUNKS_PER_SHARD
    arrays.TARGET_CHUNK_BYTES, arrays.CHUNKS_PER_SHARD = 1024, 4
    try:
        objects.create_run(st, name="r", prompt_set_id=ps, hooks={"h": (0, 64)})
    finally:
        arrays.TARGET_CHUNK_BYTES, arrays.CHUNKS_PER_SHARD = old
    proc = subprocess.run([sys.executable, "-c", WRITER.format(root=str(st.root))])
    assert proc.returncode == -signal.SIGKILL
    left = sorted(p.name for p in (tmp_path / "s").rglob("*.partial"))
    tmp = next((tmp_path / "s").rglob("*.partial"))
    assert len(left) == 1 and tmp.parent.name == "1"  # the stream of shard 1
    assert tmp.stat().st_size == 3 * (1024 + 4)  # 3 chunks + checksums, no index yet

    reader = actstore.open(st.root, read_only=True)
    np.testing.assert_array_equal(reader.acts("r", "h").numpy()[:, 0], np.arange(30))
    removed = actstore.open(st.root).recover()
    assert [os.path.basename(r) for r in removed] == left
    assert not list((tmp_path / "s").rglob("*.partial"))
    # the committed rows are untouched, and recovering again changes nothing
    np.testing.assert_array_equal(reader.acts("r", "h").numpy()[:, 0], np.arange(30))
    before = _files(tmp_path / "s" / "arrays")
    assert actstore.open(st.root).recover() == []
    assert _files(tmp_path / "s" / "arrays") == before
