"""Shards in object storage: with `shard.uri: s3://bucket/prefix` (or another URI pyarrow opens) the shard stage
uploads each tar there, the manifest (in the stage's output folder, tracked by DVC) records that location, and
training streams the shards back from it, on every node.

Endpoint and credentials come from the usual environment: AWS_ENDPOINT_URL for an S3-compatible server (MinIO,
Ceph, a test's moto), AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the node's role. Every failure is a ShardError
of one line naming the URI: an endpoint that does not answer, a missing bucket, a missing object.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import webdataset as wds

from latentzoo.errors import ShardError
from latentzoo.storage import open_location

_HINT = "re-run the shard stage (dvc repro shard)"


def is_uri(location: str | None) -> bool:
    """True for `scheme://...` (object storage), False for a local path or None."""
    return bool(location) and "://" in str(location)


@contextlib.contextmanager
def reaching(url: str, doing: str) -> Iterator[None]:
    """pyarrow's errors while `doing` something with `url` as one-line ShardErrors naming it."""
    try:
        yield
    except FileNotFoundError:
        raise ShardError(f"{url}: not found while {doing}; {_HINT}") from None
    except OSError as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ShardError(f"{url}: cannot be reached while {doing} ({reason})") from None


def check_location(location: str) -> None:
    """Fail now, naming `location`, when its server does not answer or its bucket does not exist."""
    with reaching(location, "checking the shard location"):
        filesystem, base = open_location(location)
        filesystem.get_file_info(base)  # answers even for a prefix with nothing under it yet
        filesystem.create_dir(base, recursive=True)  # S3: refused when the bucket is missing


def upload(path: Path, url: str) -> None:
    """Copy the local file `path` to `url`."""
    with reaching(url, "uploading a shard"):
        filesystem, target = open_location(url)
        with open(path, "rb") as src, filesystem.open_output_stream(target, compression=None) as dst:
            shutil.copyfileobj(src, dst, length=1 << 22)


def open_url(url: str):
    """`url` open for reading (a stream)."""
    with reaching(url, "opening a shard"):
        filesystem, path = open_location(url)
        return filesystem.open_input_stream(path, compression=None)  # bytes as stored, whatever the suffix


def sha256_url(url: str, chunk: int = 1 << 22) -> str:
    """Hex sha256 of the object at `url`, streamed."""
    digest = hashlib.sha256()
    with open_url(url) as f, reaching(url, "reading a shard"):
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def gopen_url(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    """WebDataset's opener for s3:// URLs (it has none of its own)."""
    if mode != "rb":
        raise ShardError(f"{url}: shards in object storage are read only here (mode {mode!r})")
    return open_url(url)


wds.gopen_schemes.setdefault("s3", gopen_url)  # importing this module (the loader does) teaches WebDataset s3://
