"""`ray.storage_path` as a local folder or a URI: our run records beside Ray's checkpoints, through pyarrow."""

from __future__ import annotations

from pathlib import Path

import pytest

from latentzoo.checkpoint import save_state
from latentzoo.storage import RunFolder, storage_location


def test_storage_location_keeps_uris_and_makes_paths_absolute(tmp_path):
    assert storage_location("s3://bucket/runs/", tmp_path) == "s3://bucket/runs"
    assert storage_location(None, tmp_path) == str((tmp_path / ".ray_results").resolve())
    assert storage_location("rel", Path("/x")) == str(Path("rel").resolve())


@pytest.mark.parametrize("as_uri", [False, True])
def test_run_folder_records_and_checkpoints(tmp_path, as_uri):
    storage = f"file://{tmp_path}" if as_uri else str(tmp_path)
    folder = RunFolder(storage, "vae-abc")
    assert not folder.exists() and folder.read_text("x.json") is None and folder.checkpoint_states("c.pt") == []
    folder.write_text("x.json", '{"run_id": "r"}')
    assert folder.exists("x.json") and folder.read_text("x.json") == '{"run_id": "r"}'
    for epoch in (0, 1):
        save_state(tmp_path / "vae-abc" / f"checkpoint_2026-01-0{epoch + 1}" / "c.pt", {"epoch": epoch})
    (tmp_path / "vae-abc" / "checkpoint_2026-01-03").mkdir()  # a checkpoint without the file: skipped
    assert [s["epoch"] for s in folder.checkpoint_states("c.pt")] == [1, 0]  # newest first
    folder.remove()
    assert not (tmp_path / "vae-abc").exists()
