"""Loading errors that name the problem: another model type, a missing local directory; pickle loading is never
allowed to run code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from transformers import AutoConfig, Qwen3ForCausalLM

from fun_audio_chat import FunAudioChatConfig, FunAudioChatForConditionalGeneration
from fun_audio_chat.tiny import tiny_config

SRC = Path(__file__).resolve().parents[1] / "src" / "fun_audio_chat"


def test_a_qwen3_checkpoint_is_named_as_such(tmp_path):
    Qwen3ForCausalLM(tiny_config().text_config).save_pretrained(tmp_path / "qwen")
    for load in (FunAudioChatForConditionalGeneration.from_pretrained, FunAudioChatConfig.from_pretrained):
        with pytest.raises(ValueError, match="holds a 'qwen3' checkpoint, not Fun-Audio-Chat .*AutoModelForCausalLM"):
            load(str(tmp_path / "qwen"))


@pytest.mark.parametrize("relative", ["./missing", "runs/stage1/final", "~/missing-fun-audio-chat"])
def test_a_missing_local_directory_is_not_called_a_bad_repo_id(tmp_path, monkeypatch, relative):
    monkeypatch.chdir(tmp_path)
    for source in (relative, str(tmp_path / "missing")):
        for load in (FunAudioChatForConditionalGeneration.from_pretrained, FunAudioChatConfig.from_pretrained):
            with pytest.raises(OSError, match="no such directory \\(a local path, not a Hub repo id\\)"):
                load(source)


def test_own_checkpoints_still_load(tmp_path):
    FunAudioChatForConditionalGeneration(tiny_config()).save_pretrained(tmp_path / "tiny")
    assert isinstance(AutoConfig.from_pretrained(tmp_path / "tiny"), FunAudioChatConfig)
    assert isinstance(
        FunAudioChatForConditionalGeneration.from_pretrained(tmp_path / "tiny"), FunAudioChatForConditionalGeneration
    )


def test_every_torch_load_is_weights_only():
    calls = []
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(", text):
            end = text.find("\n", text.find(")", match.end()))
            calls.append((path.name, text[match.start() : end]))
    unsafe = [(name, call) for name, call in calls if "weights_only=True" not in call]
    assert unsafe == []
