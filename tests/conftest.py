"""Shared pytest set-up: every module in tests/fixtures/ is loaded as a fixture plugin."""

from pathlib import Path

import pytest

pytest_plugins = sorted(
    f"tests.fixtures.{p.stem}"
    for p in (Path(__file__).parent / "fixtures").glob("*.py")
    if p.stem != "__init__"
)


@pytest.fixture(autouse=True)
def _forget_secrets():
    """Each test starts with no secret registered (the registry is process-wide)."""
    yield
    from dataflare import secrets

    secrets.clear()
