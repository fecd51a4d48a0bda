"""Unit tests keep their model caches out of the user's: GGUF bases the tests write are converted under a
session's temporary PEFTKIT_HOME, not `~/.cache/peftkit` (the integration tests use the real cache, where the
built-in model is converted once)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session", autouse=True)
def _own_peftkit_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    before = os.environ.get("PEFTKIT_HOME")
    os.environ["PEFTKIT_HOME"] = str(tmp_path_factory.mktemp("peftkit-home"))
    yield
    if before is None:
        os.environ.pop("PEFTKIT_HOME", None)
    else:
        os.environ["PEFTKIT_HOME"] = before
