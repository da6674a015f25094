"""Fixtures for the DataFrame proxy tests."""

from __future__ import annotations

import pytest
from _frames_support import OWNER, POLICY, World, patients


@pytest.fixture
def world() -> World:
    return World({"patients": (patients(), POLICY, OWNER)})
