"""Under CI=true a skip in the runtime and C-consumer suites fails the run (tests/conftest.py):
a runtime that did not install cannot leave CI green."""

from __future__ import annotations

from pathlib import Path

import pytest

SUITE = """
import pytest

def test_needs_a_compiler():
    pytest.skip("no C compiler")
"""
MODULE_SKIP = """
import pytest

pytest.importorskip("a_runtime_that_is_not_installed")

def test_never_runs():
    pass
"""


@pytest.fixture
def suite(pytester):
    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text(encoding="utf-8"))
    pytester.makepyfile(test_c_consumer=SUITE, test_runtime_onnx=MODULE_SKIP, test_other=SUITE)
    return pytester


def test_skips_fail_under_ci(suite, monkeypatch):
    monkeypatch.setenv("CI", "true")
    result = suite.runpytest_subprocess(
        "-p", "no:cacheprovider", "test_c_consumer.py", "test_other.py"
    )
    result.assert_outcomes(failed=1, skipped=1)  # the other suites' skips stay skips
    result.stdout.fnmatch_lines(["*skipped under CI=true*no C compiler*"])
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "test_runtime_onnx.py")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*skipped under CI=true*a_runtime_that_is_not_installed*"])
    assert result.ret != 0


def test_skips_are_skips_elsewhere(suite, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    result = suite.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(skipped=3)


def test_a_single_strict_test_fails_alone(pytester, monkeypatch):
    """The report's browser check is strict by name; its file's other skips stay skips."""
    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text(encoding="utf-8"))
    pytester.makepyfile(
        test_bench_report="""
import pytest

def test_report_html_in_headless_chromium_shows_it():
    pytest.skip("no Chromium on PATH")

def test_something_else():
    pytest.skip("not here")
"""
    )
    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1, skipped=1)
    result.stdout.fnmatch_lines(["*skipped under CI=true*no Chromium*"])
