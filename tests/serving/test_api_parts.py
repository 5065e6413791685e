"""Pieces of the HTTP API without a server: what the servers show and call from streamed text with tool calls
(the library's parser under the servers' use), request audio decoding, reply audio encoding, the per-turn
metrics."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fun_audio_chat.processing import StreamingToolCallParser, example_audio_path
from fun_audio_chat.serving.audio import AudioRequestError, decode_input_audio, encode_audio, to_pcm16
from fun_audio_chat.serving.openai_api import well_formed_calls

REPLY = (
    'Sure.<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call> and <tool_call>{"name": "b"}</tool_call>'
    "<tool_call>not json</tool_call> bye <tool"
)


def _split(pieces):
    parser = StreamingToolCallParser()
    shown = []
    for piece in pieces:
        parser.feed(piece)
        shown.append(parser.take_content())
    parser.finish()
    return "".join(shown) + parser.take_content(), well_formed_calls(parser)


def test_shown_text_and_calls_are_the_same_whole_or_streamed_at_any_cut():
    whole = _split([REPLY])
    assert whole == (
        "Sure. and <tool_call>not json</tool_call> bye <tool",
        [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}],
    )
    for cut in range(len(REPLY)):
        assert _split([REPLY[:cut], REPLY[cut:]]) == whole
    assert _split(list(REPLY)) == whole


def test_shown_text_holds_back_only_a_possible_tag():
    parser = StreamingToolCallParser()
    for piece, shown in (("Hello <to", "Hello "), ("day", "<today"), (' <tool_call>{"name"', " ")):
        parser.feed(piece)
        assert parser.take_content() == shown
    parser.finish()
    assert parser.take_content() == '<tool_call>{"name"'  # a cut-off call stays visible


@pytest.fixture(scope="module")
def processor():
    from fun_audio_chat import tiny_processor

    return tiny_processor()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def test_decode_input_audio(processor):
    raw = Path(example_audio_path()).read_bytes()
    waveform = decode_input_audio(_b64(raw), "wav", where="m", processor=processor, max_seconds=10)
    reference, rate = sf.read(example_audio_path(), dtype="float32")
    assert rate == 16000 and np.allclose(waveform, reference, atol=1e-6)
    # a data URL prefix is accepted; another container at another rate is resampled
    buffer = io.BytesIO()
    sf.write(buffer, np.repeat(reference[:, None], 2, axis=1), 16000, format="FLAC")
    flac = decode_input_audio(
        "data:audio/flac;base64," + _b64(buffer.getvalue()), "flac", where="m", processor=processor, max_seconds=10
    )
    assert flac.shape == waveform.shape


@pytest.mark.parametrize(
    ("data", "fmt", "message"),
    [
        ("", "wav", "empty"),
        ("!!", "wav", "not valid base64"),
        ("/etc/passwd", "wav", "path or URL"),
        ("file:///etc/passwd", "wav", "path or URL"),
        (_b64(b"RIFF....WAVEfmt nonsense"), "wav", "could not decode"),
        (_b64(b"x"), "aac", "format 'aac' is not supported"),
    ],
)
def test_decode_input_audio_errors(processor, data, fmt, message):
    with pytest.raises(AudioRequestError, match=message):
        decode_input_audio(data, fmt, where="messages[0].content[0].input_audio", processor=processor, max_seconds=10)


def test_decode_input_audio_limits(processor):
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(16000 * 3, dtype=np.float32), 16000, format="WAV")
    with pytest.raises(AudioRequestError, match="lasts 3.0 s, longer than this server's limit of 2 s"):
        decode_input_audio(_b64(buffer.getvalue()), "wav", where="a", processor=processor, max_seconds=2)
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(100, dtype=np.float32), 16000, format="WAV")
    with pytest.raises(AudioRequestError, match="too short"):
        decode_input_audio(_b64(buffer.getvalue()), "wav", where="a", processor=processor, max_seconds=2)


def test_encode_audio_round_trips():
    samples = np.sin(np.linspace(0, 200, 2400, dtype=np.float32)) * 0.5
    pcm = np.frombuffer(to_pcm16(samples), dtype="<i2")
    assert np.abs(pcm / 32767.0 - samples).max() < 1 / 32767
    assert to_pcm16(np.array([2.0, -2.0], dtype=np.float32)) == np.array([32767, -32767], dtype="<i2").tobytes()
    for fmt in ("wav", "flac"):
        decoded, rate = sf.read(io.BytesIO(encode_audio(samples, 24000, fmt)), dtype="int16")
        assert rate == 24000 and np.array_equal(decoded, pcm)
    assert encode_audio(samples, 24000, "pcm16") == pcm.tobytes()


def test_metrics_summary_and_prometheus():
    from fun_audio_chat.serving.engine import TurnHandle, TurnRequest, TurnResult
    from fun_audio_chat.serving.metrics import ServingMetrics

    metrics = ServingMetrics()
    for index, first_text in enumerate((0.1, 0.2, 0.3, 0.4)):
        handle = TurnHandle(TurnRequest([], speech=True), index, None)
        handle.metrics.batch_size, handle.metrics.queue_seconds = 2, 0.0
        handle.metrics.first_text_seconds, handle.metrics.first_audio_seconds = first_text, first_text + 0.1
        handle.metrics.total_seconds, handle.metrics.audio_seconds = 1.0, 2.0
        metrics.record(handle, TurnResult("", [], None, 24000, "stop", handle.metrics), None)
    metrics.record(handle, None, RuntimeError("boom"))
    summary = metrics.summary()
    assert summary["counters"]["turns_completed"] == 4 and summary["counters"]["turns_failed"] == 1
    assert summary["summaries"]["first_text_seconds"]["median"] == pytest.approx(0.25)
    assert summary["summaries"]["real_time_factor"]["median"] == pytest.approx(0.5)
    text = metrics.prometheus(queue_depth=3)
    # prometheus_client's exposition: cumulative buckets (first audio 0.3, 0.35, 0.4, 0.45 s)
    assert 'fun_audio_chat_turn_first_audio_seconds_bucket{le="0.3"} 1.0' in text
    assert 'fun_audio_chat_turn_first_audio_seconds_bucket{le="0.5"} 4.0' in text
    assert "fun_audio_chat_turn_first_audio_seconds_count 4.0" in text
    assert "fun_audio_chat_turns_failed_total 1.0" in text
    assert "fun_audio_chat_queue_depth 3.0" in text
