"""transformers' own model linter (``transformers-mlinter``, the structural checks transformers runs on its model files)
passes on the package, apart from the findings docs/architecture.md#transformers-model-linter keeps with a reason.

The linter scans the files with in-tree names (``modeling_*.py``, ``configuration_*.py``, ``processing_*.py``, ...);
a finding suppressed in the source (``# trf-ignore: TRFnnn``) carries its reason next to it.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "fun_audio_chat"

# (file relative to the package, rule) -> why the finding stays. The same list is in docs/architecture.md.
KEPT = {
    ("modeling/modeling_fun_audio_chat.py", "TRF002"): (
        "base_model_prefix stays empty: the official state-dict keys carry no prefix and the model has no single base "
        "model (the LLM, two audio encoders and the speech head); the rule has no source suppression"
    ),
    ("token2wav/modeling_cosyvoice3.py", "TRF002"): (
        "base_model_prefix stays empty: converted and official CosyVoice 3 keys (flow.*, hift.*) carry no prefix and "
        "the detokenizer has no single base model (flow and vocoder); the rule has no source suppression"
    ),
}


def test_transformers_model_linter_passes(tmp_path):
    # no skip: make test installs the test extra, so a missing linter is a broken install, not a reason to pass
    assert importlib.util.find_spec("mlinter") is not None, (
        "transformers-mlinter is missing: it is in the test extra (pip install -e '.[test]')"
    )
    report = tmp_path / "findings.json"
    run = subprocess.run(
        [sys.executable, "-m", "mlinter", "--no-progress", "--no-cache", "--output-json", str(report), str(PACKAGE)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.is_file(), f"the linter wrote no report (exit {run.returncode}):\n{run.stdout}\n{run.stderr}"
    findings = json.loads(report.read_text())["findings"]
    found = {(Path(item["path"]).resolve().relative_to(PACKAGE).as_posix(), item["rule"]) for item in findings}
    unexpected = [
        item
        for item in findings
        if (Path(item["path"]).resolve().relative_to(PACKAGE).as_posix(), item["rule"]) not in KEPT
    ]
    assert not unexpected, "new model-linter findings:\n" + "\n".join(
        f"{item['path']}:{item['line']}: {item['message']}" for item in unexpected
    )
    stale = set(KEPT) - found
    assert not stale, f"kept findings the linter no longer reports (drop them from KEPT and the docs): {sorted(stale)}"
