"""``fun-audio-chat serve`` argument handling (the server itself is exercised by test_browser.py)."""

from __future__ import annotations

import socket

import pytest

from fun_audio_chat.cli import CLIError, _serve_detokenizer, main


def test_port_in_use_is_a_one_line_error(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fun-audio-chat serve: error: --port") and "pick another --port" in err
    assert len(err.splitlines()) == 1


def test_serve_detokenizer_choices(tmp_path):
    from fun_audio_chat.tiny import tiny_detokenizer

    assert _serve_detokenizer("none", "tiny") is None
    assert _serve_detokenizer(None, "org/model") is None  # a real model speaks only with --detokenizer DIR
    assert _serve_detokenizer(None, "tiny").sample_rate == 24000
    saved = tmp_path / "detokenizer"
    tiny_detokenizer(seed=0).save_pretrained(saved)
    loaded = _serve_detokenizer(str(saved), "org/model")
    assert loaded.sample_rate == 24000 and callable(loaded.streaming_session)
    with pytest.raises(CLIError, match="directory not found"):
        _serve_detokenizer(str(tmp_path / "missing"), "tiny")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CLIError, match="could not load it"):
        _serve_detokenizer(str(tmp_path / "empty"), "tiny")
