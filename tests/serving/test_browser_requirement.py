"""Without Chromium the browser test skips and says how to enable it; with FUN_AUDIO_CHAT_REQUIRE_BROWSER=1 (what
``.ci/run`` sets) the same situation fails, so CI can never skip it silently."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BROWSER_TEST = Path(__file__).with_name("test_browser.py")


def run_without_chromium(required: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "FUN_AUDIO_CHAT_CHROMIUM": "/nonexistent/chromium"}
    env.pop("FUN_AUDIO_CHAT_REQUIRE_BROWSER", None)
    if required:
        env["FUN_AUDIO_CHAT_REQUIRE_BROWSER"] = "1"
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(BROWSER_TEST)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_missing_browser_skips_with_how_to_enable_it():
    result = run_without_chromium(required=False)
    assert result.returncode == 0, result.stdout[-2000:]
    assert "1 skipped" in result.stdout and "apt-get install -y chromium chromium-driver" in result.stdout


def test_missing_browser_fails_when_ci_requires_it():
    result = run_without_chromium(required=True)
    assert result.returncode == 1, result.stdout[-2000:]
    assert "FUN_AUDIO_CHAT_REQUIRE_BROWSER=1 forbids skipping" in result.stdout
