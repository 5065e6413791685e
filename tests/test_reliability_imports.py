"""``import fun_audio_chat`` and the CLI's ``--help`` / argument errors do not import torch or transformers, and the
Auto classes still know Fun-Audio-Chat after ``import fun_audio_chat`` (whichever of the two is imported first)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

HEAVY = ("torch", "transformers")


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_help_and_argument_errors_do_not_import_torch_or_transformers():
    code = f"""
import contextlib, io, json, sys
import fun_audio_chat
from fun_audio_chat.cli import main
codes = []
for argv in (["--help"], ["merge", "--help"], ["chat", "--model", "tiny", "--audio", "x.wav", "--max-new-tokens", "0"],
             ["demo", "--threads", "-1"], ["no-such-command"]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            codes.append(main(argv))
        except SystemExit as exit:
            codes.append(exit.code)
print(json.dumps({{"codes": codes, "loaded": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""
    result = json.loads(_run(code))
    assert result["codes"] == [0, 0, 2, 2, 2]
    assert result["loaded"] == []


@pytest.mark.parametrize("transformers_first", [False, True])
def test_auto_classes_know_fun_audio_chat_after_import(transformers_first):
    code = f"""
import json, sys
if {transformers_first}:
    import transformers
import fun_audio_chat
light = "torch" not in sys.modules
from transformers import AutoConfig, AutoModelForMultimodalLM, AutoModelForSeq2SeqLM
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
config = AutoConfig.for_model("funaudiochat")
print(json.dumps({{
    "light": light,
    "config": type(config).__name__,
    "seq2seq": AutoModelForSeq2SeqLM._model_mapping[type(config)].__name__,
    "multimodal": AutoModelForMultimodalLM._model_mapping[type(config)].__name__,
    "processor": PROCESSOR_MAPPING[type(config)].__name__,
}}))
"""
    result = json.loads(_run(code))
    assert result["config"] == "FunAudioChatConfig"
    assert result["seq2seq"] == result["multimodal"] == "FunAudioChatForConditionalGeneration"
    assert result["processor"] == "FunAudioChatProcessor"
    if not transformers_first:
        assert result["light"]  # torch came with the Auto classes, not with `import fun_audio_chat`


def test_names_load_on_first_access():
    code = """
import json, sys
import fun_audio_chat
before = "torch" in sys.modules
from fun_audio_chat import FunAudioChatForConditionalGeneration, tiny_processor
print(json.dumps({"before": before, "model": FunAudioChatForConditionalGeneration.__name__,
                  "all": sorted(fun_audio_chat.__all__) == sorted(set(fun_audio_chat.__all__) & set(dir(fun_audio_chat)))}))
"""
    result = json.loads(_run(code))
    assert result == {"before": False, "model": "FunAudioChatForConditionalGeneration", "all": True}
