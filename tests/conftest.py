"""Shared fixtures: a whole temporary installation per test, always cleaned up."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.system import System  # noqa: E402


@pytest.fixture
def make_system():
    systems: list[System] = []

    def make(overrides: dict | None = None) -> System:
        system = System(overrides)
        systems.append(system)
        return system

    yield make
    for system in systems:
        system.cleanup()
