"""Shared pytest setup: skip ``cuda``-marked tests without a GPU, and a seeded-RNG fixture.

The thread count is left at the machine's default here; modules that spawn many small ops on a shared
machine opt into one thread through ``helpers.single_thread``.
"""

from __future__ import annotations

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA device; skipped without one")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed() -> int:
    """Seed torch's global RNG so a test's random inputs are the same on every run."""
    torch.manual_seed(1234)
    return 1234
