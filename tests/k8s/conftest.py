"""Fixtures: the fake Kubernetes API on a free loopback port, and a kubeconfig pointing at it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.k8s.fake_apiserver import FakeApiServer, running


@pytest.fixture
def fake_api() -> Iterator[FakeApiServer]:
    with running() as server:
        yield server


@pytest.fixture
def kubeconfig(fake_api: FakeApiServer, tmp_path: Path) -> Path:
    return fake_api.write_kubeconfig(tmp_path / "kubeconfig")
