"""The CLI's detokenizer wiring: convert-detokenizer, chat --detokenizer PATH writing reply.wav, demo audio."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys

import pytest
import soundfile as sf
import torch

from fun_audio_chat import CosyVoice3Detokenizer
from fun_audio_chat.cli import main
from fun_audio_chat.processing import example_audio_path

from .conftest import OFFICIAL_DIR


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit:
            code = exit.code
    return code, out.getvalue(), err.getvalue()


def test_convert_detokenizer_writes_a_loadable_folder(official_model, tmp_path):
    code, out, err = run(["convert-detokenizer", str(OFFICIAL_DIR), str(tmp_path / "converted")])
    assert code == 0, err
    assert "model.safetensors" in out and "745,376" in out  # the tiny oracle flow's parameter count
    converted = CosyVoice3Detokenizer.from_pretrained(tmp_path / "converted")
    assert torch.equal(converted([1, 2, 3, 4, 5, 6]), official_model([1, 2, 3, 4, 5, 6]))
    # refuses to write into a non-empty folder, and a folder that is not a checkpoint
    code, _, err = run(["convert-detokenizer", str(OFFICIAL_DIR), str(tmp_path / "converted")])
    assert code == 2 and "not empty" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(["convert-detokenizer", str(tmp_path), str(tmp_path / "other")])
    assert code == 2 and "could not convert a CosyVoice 3 checkpoint" in err
    # a converted folder is not converted again
    code, _, err = run(["convert-detokenizer", str(tmp_path / "converted"), str(tmp_path / "again")])
    assert code == 2 and "already a converted folder" in err


def test_conversion_script_writes_the_same_folder_as_the_cli(official_model, tmp_path):
    from fun_audio_chat.token2wav.convert_official import main as convert_main

    assert convert_main([str(OFFICIAL_DIR), str(tmp_path / "script")]) == 0
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "script" / "model.safetensors"))
    assert state.keys() == official_model.state_dict().keys()
    for key, value in official_model.state_dict().items():
        assert torch.equal(state[key], value), key
    # an official folder with the released speakers' table: the script writes them as voices too
    import shutil

    from fun_audio_chat.token2wav import CosyVoice3Voice

    from ..voices.test_official_and_registry import official_table

    shutil.copytree(OFFICIAL_DIR, tmp_path / "with_speakers")
    torch.save(official_table(vocab=6561), tmp_path / "with_speakers" / "new_spk2info.pt")
    assert convert_main([str(tmp_path / "with_speakers"), str(tmp_path / "script2")]) == 0
    voices = sorted(path.stem for path in (tmp_path / "script2" / "voices").glob("*.safetensors"))
    assert voices == ["中文女", "中文男"]
    assert CosyVoice3Voice.load(tmp_path / "script2" / "voices" / "中文男.safetensors").prompt_codes.numel() == 40


@pytest.mark.slow
def test_chat_with_a_detokenizer_folder_writes_reply_wav(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "detok")
    out_dir = tmp_path / "reply"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fun_audio_chat.cli",
            "chat",
            "--model",
            "tiny",
            "--audio",
            str(example_audio_path()),
            "--out",
            str(out_dir),
            "--max-new-tokens",
            "6",
            "--seed",
            "0",
            "--threads",
            "1",
            "--detokenizer",
            str(tmp_path / "detok"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    import json

    codes = json.loads((out_dir / "speech_codes.json").read_text())["codes"]
    data, rate = sf.read(out_dir / "reply.wav", dtype="float32")
    assert rate == 24000 and data.shape == (len(codes) * 960,)
    torch.testing.assert_close(torch.from_numpy(data), tiny(codes), atol=1e-4, rtol=0)  # 16-bit wav


def test_chat_detokenizer_errors_are_one_line(tmp_path):
    code, _, err = run(
        ["chat", "--model", "tiny", "--audio", str(example_audio_path()), "--detokenizer", str(tmp_path / "missing")]
    )
    assert code == 2 and "--detokenizer" in err and len(err.strip().splitlines()) == 1
