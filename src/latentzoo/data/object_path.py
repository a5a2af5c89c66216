"""A source in object storage: `data.path: s3://bucket/mnist` (or another URI pyarrow opens).

The source readers (`latentzoo.data.sources`) use a handful of `pathlib.Path`'s methods on `data.path`; an
`ObjectPath` answers the same ones (``/``, name, suffix, is_dir, is_file, iterdir, relative_to, open) through
pyarrow's filesystem for that URI, so an IDX pair or an image folder is read from a bucket exactly as from a disk,
one object at a time (prepare's and shard's memory does not grow with the source). A listing remembers each
entry's type, so walking an image folder costs one request per folder, not one per file. Endpoint and credentials
come from the environment, as for shards in object storage (`latentzoo.data.remote`).
"""

from __future__ import annotations

import functools
import io
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from latentzoo.storage import open_location

READ_BUFFER = 4 << 20  # bytes fetched per request when reading an object
ENDPOINT_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID")


@dataclass(frozen=True, order=True)  # ordered by URI: within one folder, by name, as Paths sort
class ObjectPath:
    """The object or prefix at `uri`; `kind` is "file" or "dir" when a listing said so (None: ask the server)."""

    uri: str
    kind: str | None = None

    def __truediv__(self, name: str) -> ObjectPath:
        return ObjectPath(f"{self.uri.rstrip('/')}/{name}")

    def __str__(self) -> str:
        return self.uri

    @property
    def name(self) -> str:
        return self.uri.rstrip("/").rpartition("/")[2]

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    def _kind(self) -> str | None:
        from pyarrow import fs

        if self.kind is not None:
            return self.kind
        filesystem, path = _located(self.uri)
        found = filesystem.get_file_info(path).type
        return {fs.FileType.File: "file", fs.FileType.Directory: "dir"}.get(found)

    def is_dir(self) -> bool:
        return self._kind() == "dir"

    def is_file(self) -> bool:
        return self._kind() == "file"

    def iterdir(self) -> list[ObjectPath]:
        """The entries directly under this prefix, each with its type."""
        from pyarrow import fs

        filesystem, path = _located(self.uri)
        entries = filesystem.get_file_info(fs.FileSelector(path, allow_not_found=True))
        kinds = {fs.FileType.File: "file", fs.FileType.Directory: "dir"}
        return [ObjectPath((self / e.base_name).uri, kinds.get(e.type)) for e in entries]

    def relative_to(self, other: ObjectPath) -> PurePosixPath:
        prefix = other.uri.rstrip("/") + "/"
        if not self.uri.startswith(prefix):
            raise ValueError(f"{self.uri} is not under {other.uri}")
        return PurePosixPath(self.uri[len(prefix) :])

    def open(self, mode: str = "rb") -> io.BufferedReader:
        """The object for reading, seekable, through a `READ_BUFFER` buffer: one ranged request per buffer, where
        an IDX reader's small reads would make one each. Read errors are OSErrors, as a local file's are."""
        if mode != "rb":
            raise ValueError(f"{self.uri}: a source in object storage is read only (mode {mode!r})")
        filesystem, path = _located(self.uri)
        return io.BufferedReader(filesystem.open_input_file(path), buffer_size=READ_BUFFER)

    def read_image_file(self) -> io.BytesIO:
        """The object's bytes as a file PIL opens; PIL's messages name the URI, as they name a local file's path."""
        with self.open() as f:
            return _Named(f.read(), self.uri)


class _Named(io.BytesIO):
    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.name = name

    def __repr__(self) -> str:
        return repr(self.name)


def _located(uri: str):
    """(pyarrow filesystem, path) of `uri`: one filesystem per bucket and endpoint, made once (making one costs
    ~10 ms, which an image folder would pay per image)."""
    scheme, _, rest = uri.partition("://")
    bucket, slash, key = rest.partition("/")
    endpoint = tuple(os.environ.get(name, "") for name in ENDPOINT_ENV)
    try:
        filesystem, base = _bucket(f"{scheme}://{bucket}", endpoint)
    except (OSError, ValueError):  # a URI whose scheme wants more than scheme://host to make its filesystem
        return open_location(uri)
    return filesystem, f"{base.rstrip('/')}{slash}{key}"


@functools.lru_cache(maxsize=16)
def _bucket(root: str, endpoint: tuple[str, ...]):
    return open_location(root)


def source_path(path: str) -> Path | ObjectPath:
    """`data.path` as the readers use it: a local Path, or an ObjectPath for a URI."""
    return ObjectPath(path) if "://" in path else Path(path)
