"""Fixtures of the deployment checks (helpers: deploy_support.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# importlib mode does not put test folders on sys.path.
sys.path.insert(0, str(Path(__file__).parent))
from deploy_support import Chart, find_tool  # noqa: E402


@pytest.fixture(scope="session")
def chart(tmp_path_factory) -> Chart:
    return Chart(find_tool("helm"), tmp_path_factory.mktemp("helm-home"))


@pytest.fixture(scope="session")
def tool():
    """find_tool: the path of a real tool, or a failed test naming how to install it."""
    return find_tool
