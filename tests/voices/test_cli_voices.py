"""The voice lifecycle through the console script, each command in a subprocess: ``clone-voice`` (tiny encoders),
``convert-detokenizer`` with the released speaker table (a synthetic ``spk2info.pt`` in the official fixture
folder), then ``chat --voice`` with a cloned voice file and with a converted speaker's name; reply.wav must be the
detokenizer's rendering of the reply's codes in that voice. Error cases call ``main`` in this process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from fun_audio_chat.processing import example_audio_path

from .conftest import voiced_clip

pytestmark = pytest.mark.slow  # console-script subprocesses
OFFICIAL_FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "cosyvoice3" / "model"
TIMEOUT = 240


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "fun-audio-chat"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "fun_audio_chat.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUN_AUDIO_CHAT_")}
    env.update(TQDM_DISABLE="1", HF_HUB_OFFLINE="1", HF_HOME=str(cwd / "hf_home"), TRANSFORMERS_VERBOSITY="error")
    return subprocess.run(
        command + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def _speaker_table() -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        name: {
            "embedding": torch.randn(1, 192, generator=generator),
            "speech_token": torch.randint(0, 6561, (1, 40), generator=generator, dtype=torch.int32),
            "speech_feat": torch.randn(1, 83, 80, generator=generator) - 5,
        }
        for name in ("中文女", "中文男")
    }


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("kaldi_native_fbank")
    work = tmp_path_factory.mktemp("voice_cli")
    sf.write(work / "anna.wav", voiced_clip(10.0), 16000)
    shutil.copytree(OFFICIAL_FIXTURE, work / "official")
    torch.save(_speaker_table(), work / "official" / "spk2info.pt")
    with ThreadPoolExecutor(2) as pool:
        clone = pool.submit(_run, ["clone-voice", "anna.wav", "voices/anna.safetensors", "--encoders", "tiny"], work)
        convert = pool.submit(_run, ["convert-detokenizer", "official", "converted"], work)
        results = {"clone": clone.result(), "convert": convert.result()}
    chat = ["chat", "--model", "tiny", "--audio", example_audio_path(), "--max-new-tokens", "8", "--seed", "0"]
    with ThreadPoolExecutor(2) as pool:
        cloned = pool.submit(
            _run, chat + ["--detokenizer", "tiny", "--voice", "voices/anna.safetensors", "--out", "reply_anna"], work
        )
        released = pool.submit(
            _run, chat + ["--detokenizer", "converted", "--voice", "中文男", "--out", "reply_m"], work
        )
        results.update(chat_cloned=cloned.result(), chat_released=released.result())
    return work, results


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_clone_voice_writes_a_voice_file(lifecycle):
    work, results = lifecycle
    out = _ok(results["clone"])
    assert "wrote voice 'anna'" in out and "250 prompt codes (10.0 s), 500 mel frames" in out
    from fun_audio_chat.token2wav import CosyVoice3Voice

    voice = CosyVoice3Voice.load(work / "voices" / "anna.safetensors")
    assert voice.name == "anna" and voice.prompt_tokens == 250


def test_convert_detokenizer_writes_the_released_speakers_as_voices(lifecycle):
    work, results = lifecycle
    out = _ok(results["convert"])
    assert "wrote 2 voice(s) with their prompts" in out and "中文女, 中文男" in out
    from fun_audio_chat.token2wav import CosyVoice3Voice

    voice = CosyVoice3Voice.load(work / "converted" / "voices" / "中文男.safetensors")
    assert voice.prompt_tokens == 40 and voice.prompt_mel.shape == (80, 80)  # min(83 // 2, 40) codes, 2 frames each


def _reply_matches_the_voice(work: Path, folder: str, detokenizer, voice):
    codes = json.loads((work / folder / "speech_codes.json").read_text())["codes"]
    assert codes, "the tiny reply has speech codes"
    spoken, rate = sf.read(work / folder / "reply.wav", dtype="float32")
    expected = np.asarray(detokenizer(codes, voice=voice), dtype=np.float32)
    assert rate == 24000 and spoken.shape == expected.shape
    np.testing.assert_allclose(spoken, expected, atol=1 / 32768 + 1e-6)  # 16-bit wav
    assert not np.allclose(spoken, np.asarray(detokenizer(codes), dtype=np.float32), atol=1e-3)  # not the default


def test_chat_speaks_in_a_cloned_voice_file(lifecycle, tiny_detokenizer):
    from fun_audio_chat.token2wav import CosyVoice3Voice

    work, results = lifecycle
    _ok(results["chat_cloned"])
    _reply_matches_the_voice(
        work, "reply_anna", tiny_detokenizer, CosyVoice3Voice.load(work / "voices" / "anna.safetensors")
    )


def test_chat_speaks_in_a_released_speaker_by_name(lifecycle):
    from fun_audio_chat import CosyVoice3Detokenizer
    from fun_audio_chat.token2wav import CosyVoice3Voice

    work, results = lifecycle
    _ok(results["chat_released"])
    detokenizer = CosyVoice3Detokenizer.from_pretrained(work / "converted")
    voice = CosyVoice3Voice.load(work / "converted" / "voices" / "中文男.safetensors")
    _reply_matches_the_voice(work, "reply_m", detokenizer, voice)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["clone-voice", "{short}", "x.safetensors", "--encoders", "tiny"], "2.0 s long; a voice needs 3 to 30 s"),
        (["clone-voice", "{short}", "x.wav", "--encoders", "tiny"], "a voice file ends in .safetensors"),
        (["clone-voice", "{short}", "x.safetensors"], "--encoders: pass the official CosyVoice 3 folder"),
        (["clone-voice", "{short}", "x.safetensors", "--encoders", "{tmp}"], "has no campplus.onnx"),
        (
            ["chat", "--model", "tiny", "--audio", "{short}", "--detokenizer", "tiny", "--voice", "bob"],
            "--voice bob: unknown voice 'bob'; available voices: default.",
        ),
        (
            ["chat", "--model", "tiny", "--audio", "{short}", "--detokenizer", "tiny", "--voice", "{short}"],
            "is not a voice file (.safetensors); if it is a recording, clone it first",
        ),
    ],
    ids=["short-clip", "not-safetensors", "no-encoders", "folder-without-campplus", "unknown-voice", "clip-as-voice"],
)
def test_voice_errors_are_one_line_with_status_2(tmp_path, capsys, monkeypatch, argv, message):
    from fun_audio_chat.cli import main

    monkeypatch.delenv("FUN_AUDIO_CHAT_COSYVOICE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    sf.write(tmp_path / "short.wav", voiced_clip(2.0), 16000)
    argv = [arg.format(short=tmp_path / "short.wav", tmp=tmp_path) for arg in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
