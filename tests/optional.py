"""Optional extras (moto, onnxruntime, wilds): their tests skip where an extra is not installed, and
fail instead where TALLY_REQUIRE_EXTRAS is set (.ci/run sets it): a broken install in CI must not
turn into a quiet skip and a green run."""

from __future__ import annotations

import os

import pytest

REQUIRE_ENV = "TALLY_REQUIRE_EXTRAS"


def require(module: str, reason: str):
    """The imported module; else a skip, or a failure where REQUIRE_ENV is set."""
    try:
        return pytest.importorskip(module, reason=reason)
    except pytest.skip.Exception:
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(f"{REQUIRE_ENV} is set but {module} cannot be imported: {reason}", pytrace=False)
        raise
