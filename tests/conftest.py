"""Shared fixtures. Every test that writes data or runs points HPE_DATA_DIR / HPE_RUNS_DIR at a
temporary folder, so the repository's own data/ and runs/ are never touched."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def run_root(tmp_path, monkeypatch):
    """A temporary runs/ folder."""
    monkeypatch.setenv("HPE_RUNS_DIR", str(tmp_path / "runs"))
    return tmp_path / "runs"
