"""Why the package registers its Auto classes through an import hook (docs/architecture.md#auto-class-registration):
touching transformers' Auto classes imports torch, so registering plainly in ``fun_audio_chat/__init__.py`` would
make every ``import fun_audio_chat`` (and ``fun-audio-chat --help``) import torch and transformers.

When a transformers release no longer imports torch there, this test fails: register plainly then and drop the
hook. (The behaviour the hook gives, in both import orders, is tested in ``tests/test_reliability_imports.py``.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_touching_the_auto_classes_imports_torch():
    code = "import sys, transformers; before = 'torch' in sys.modules; transformers.AutoConfig; " + (
        "print(before, 'torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["False", "True"], (
        "transformers' AutoConfig no longer imports torch: register the Auto classes plainly in "
        "fun_audio_chat/__init__.py and remove the import hook"
    )
