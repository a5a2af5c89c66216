"""Where Ray Train and Ray Tune keep runs (`ray.storage_path`): a local folder, or a URI pyarrow opens
(s3://bucket/prefix, gs://..., file:///...), as Ray's `RunConfig(storage_path=...)` accepts.

Beside Ray's checkpoints, a run's folder holds our small records: the MLflow run it logs to (resumed by a rerun)
and a marker once it finished. `RunFolder` reads and writes them through the same filesystem Ray uses, so a run
on a cluster with object storage resumes and is recognised as finished like a local one.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

QUEUED_EXPERIMENTS = (".dvc", "tmp", "exps")  # where DVC runs a queued experiment: a temporary copy of the repo


def project_root(path: Path | None = None) -> Path:
    """The project a stage works for: `path` (default: the working directory), resolved, or, for an experiment DVC
    runs from its queue (in a temporary copy under <project>/.dvc/tmp/exps/), the project itself, so that the
    experiment's runs land in the project's mlflow.db and .ray_results instead of vanishing with the copy."""
    path = Path(path or Path.cwd()).resolve()
    n = len(QUEUED_EXPERIMENTS)
    for i in range(len(path.parts) - n + 1):
        if path.parts[i : i + n] == QUEUED_EXPERIMENTS:
            return Path(*path.parts[:i])
    return path


def storage_location(storage_path: str | None, root: Path) -> str:
    """`ray.storage_path` as Ray gets it: a URI as given, a local path made absolute (default <root>/.ray_results)."""
    if storage_path and "://" in storage_path:
        return storage_path.rstrip("/")
    return str(Path(storage_path or Path(root) / ".ray_results").resolve())


def open_location(location: str):
    """(pyarrow filesystem, path) of a local folder or a URI (s3://, gs://, file://, hdfs://)."""
    from pyarrow import fs

    if "://" in location:
        return fs.FileSystem.from_uri(location)
    return fs.LocalFileSystem(), str(Path(location).resolve())


def write_file(location: str, name: str, data: bytes) -> None:
    """`location/name` := data, creating the folder (a local path or a URI)."""
    filesystem, base = open_location(location)
    filesystem.create_dir(base, recursive=True)
    with filesystem.open_output_stream(f"{base}/{name}") as f:
        f.write(data)


def read_file(location: str, name: str) -> bytes:
    """The bytes of `location/name`; FileNotFoundError or OSError when it cannot be read."""
    filesystem, base = open_location(location)
    with filesystem.open_input_stream(f"{base}/{name}") as f:
        return f.read()


@dataclass(frozen=True)
class RunFolder:
    """The folder of one Ray run: `<storage>/<name>`."""

    storage: str  # what RunConfig(storage_path=...) gets
    name: str

    @property
    def location(self) -> str:
        return f"{self.storage}/{self.name}"

    def _fs(self):
        return open_location(self.location)

    def exists(self, file: str = "") -> bool:
        from pyarrow import fs

        filesystem, path = self._fs()
        return filesystem.get_file_info(f"{path}/{file}".rstrip("/")).type != fs.FileType.NotFound

    def read_text(self, file: str) -> str | None:
        try:
            return read_file(self.location, file).decode()
        except (FileNotFoundError, OSError):
            return None

    def write_text(self, file: str, text: str) -> None:
        write_file(self.location, file, text.encode())

    def remove(self) -> None:
        filesystem, path = self._fs()
        if self.exists():
            filesystem.delete_dir(path)

    def checkpoint_states(self, file: str) -> list[dict]:
        """The `file` state of each of Ray's checkpoint_* folders, newest first; unreadable ones left out."""
        if not self.exists():
            return []
        filesystem, path = self._fs()
        return [state for _, state in readable_checkpoints(filesystem, path, file)]

    def newest_checkpoint_state(self, file: str) -> dict | None:
        """The `file` state of the newest readable checkpoint_* folder (only that one is read), or None."""
        if not self.exists():
            return None
        filesystem, path = self._fs()
        return next((state for _, state in readable_checkpoints(filesystem, path, file)), None)


def readable_checkpoints(filesystem, run_path: str, file: str, before: str | None = None):
    """(folder, state) of the `file` in each of Ray's checkpoint_* folders under `run_path` (a pyarrow filesystem
    path), newest first, read lazily; only folders whose name sorts before `before` with it; unreadable files are
    skipped (a checkpoint cut short by a full disk or a crash mid-upload)."""
    import torch
    from pyarrow import fs

    found = filesystem.get_file_info(fs.FileSelector(run_path, recursive=False))
    folders = sorted(
        (
            info.path
            for info in found
            if info.type == fs.FileType.Directory
            and info.base_name.startswith("checkpoint_")
            and (before is None or info.base_name < before)
        ),
        reverse=True,
    )
    for folder in folders:
        try:
            with filesystem.open_input_stream(f"{folder}/{file}") as f:
                state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
        except Exception:  # unreadable or missing: the next one may do
            continue
        yield folder, state
