"""Shared fixtures: the shared data folder (tests that need it skip with a reason when it is absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared_model.data.locate import data_root


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = data_root()
    if root is None or not root.is_dir():
        pytest.skip("the shared data folder (../shared/data or $TMEPSR_DATA_DIR) is absent on this machine")
    return root


@pytest.fixture()
def task_identity(monkeypatch):
    """The task identity a SuperNode sets for the ClientApp process it starts (needed to build messages)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


def require_dataset(root: Path, name: str) -> Path:
    folder = root / name
    if not folder.is_dir():
        pytest.skip(f"{name} is not in {root}")
    return folder
