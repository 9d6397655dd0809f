"""tests/optional.require: a missing extra skips on a laptop and fails in CI (TALLY_REQUIRE_EXTRAS)."""

from __future__ import annotations

import pytest

from tests.optional import REQUIRE_ENV, require


def test_a_missing_extra_skips_without_the_variable(monkeypatch):
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception):
        require("tally_no_such_extra", "not installed")


def test_a_missing_extra_fails_where_ci_requires_it(monkeypatch):
    monkeypatch.setenv(REQUIRE_ENV, "1")
    # a skip must not pass for the failure (nor skip this test): both outcomes are caught and told apart
    with pytest.raises((pytest.fail.Exception, pytest.skip.Exception)) as outcome:
        require("tally_no_such_extra", "not installed")
    assert outcome.type is pytest.fail.Exception, outcome.value
    assert "tally_no_such_extra cannot be imported" in str(outcome.value)


def test_an_installed_module_is_returned(monkeypatch):
    monkeypatch.setenv(REQUIRE_ENV, "1")
    assert require("json", "stdlib").dumps([1]) == "[1]"
