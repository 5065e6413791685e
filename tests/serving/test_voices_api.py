"""Voices through both serving APIs with the real ``openai`` client: a cloned voice and a released-speaker-shaped
voice registered by name, ``GET /v1/voices``, chat completions ``audio.voice`` (the same voice gives the same audio
streamed or whole under greedy settings, another voice other audio), the Realtime API's
``session.audio.output.voice`` (the same reply bytes as chat completions in that voice), unknown voices refused with
the list of voices there are; and ``serve --voice`` building the registry."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import urllib.request

import pytest
import soundfile as sf
import torch

from fun_audio_chat.serving import ServingEngine

from .conftest import LocalServer, speech_like, tiny_detokenizer_or_none

openai = pytest.importorskip("openai")
pytest.importorskip("onnxruntime")
pytest.importorskip("kaldi_native_fbank")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def voices():
    from fun_audio_chat.token2wav import CosyVoice3Voice
    from fun_audio_chat.voices import tiny_voice_cloner

    anna = tiny_voice_cloner().clone(speech_like(3.0, 150), name="anna", sampling_rate=16000)
    generator = torch.Generator().manual_seed(0)
    released = CosyVoice3Voice(  # shaped like a converted official speaker (tiny code range)
        "中文女",
        torch.randn(1, 192, generator=generator),
        torch.randint(0, 296, (1, 40), generator=generator),
        torch.randn(1, 80, 80, generator=generator) - 5,
    )
    return anna, released


@pytest.fixture(scope="module")
def server(tiny_pair, voices):
    from fun_audio_chat.voices import VoiceRegistry

    model, processor = tiny_pair
    detokenizer = tiny_detokenizer_or_none()
    engine = ServingEngine(model, processor, detokenizer, max_batch_size=4, batch_window=0.05)
    registry = VoiceRegistry(voices, config=detokenizer.config)
    with LocalServer(engine, "tiny", default_max_tokens=12, voices=registry) as running:
        yield running


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


def spoken(client, voice, audio_format="pcm16", stream=False) -> bytes:
    """The reply's PCM16 bytes (24 kHz) in ``voice`` under greedy settings."""
    reply = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        modalities=["text", "audio"],
        audio={"voice": voice, "format": audio_format},
        temperature=0,
        max_tokens=10,
        stream=stream,
    )
    if not stream:
        data = base64.b64decode(reply.choices[0].message.audio.data)
        return sf.read(__import__("io").BytesIO(data), dtype="int16")[0].tobytes() if audio_format == "wav" else data
    pieces = []
    for chunk in reply:
        audio = getattr(chunk.choices[0].delta, "audio", None) if chunk.choices else None
        if audio is not None:
            audio = audio if isinstance(audio, dict) else audio.model_dump()
            if audio.get("data"):
                pieces.append(base64.b64decode(audio["data"]))
    return b"".join(pieces)


def test_the_voices_are_listed(server):
    with urllib.request.urlopen(f"{server.url}/v1/voices", timeout=30) as response:
        listed = json.loads(response.read())
    assert [voice["id"] for voice in listed["data"]] == ["default", "anna", "中文女"]
    assert [voice["default"] for voice in listed["data"]] == [True, False, False]
    assert listed["data"][2]["prompt_seconds"] == pytest.approx(40 / 25)


def test_a_voice_gives_the_same_audio_streamed_or_whole_and_other_voices_differ(server):
    client = server.client()
    whole = spoken(client, "anna", "wav")
    assert len(whole) > 24000  # more than half a second of 16-bit samples
    assert spoken(client, "anna", stream=True) == whole
    assert spoken(client, "anna", "pcm16") == whole
    default = spoken(client, "default")
    assert spoken(client, "alloy") == default  # OpenAI's names select the default voice
    released = spoken(client, "中文女")
    assert len(default) == len(whole) == len(released)  # the same reply codes ...
    assert default != whole and released != whole and released != default  # ... in three voices


def test_an_unknown_voice_is_a_400_naming_the_voices(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as caught:
        spoken(client, "bob")
    error = caught.value.body
    assert error["param"] == "audio.voice" and error["code"] == "voice_not_found"
    assert "unknown voice 'bob'; available voices: default, anna, 中文女." in error["message"]
    with pytest.raises(openai.BadRequestError, match="unknown voice 'bob'"):
        spoken(client, {"id": "bob"})


def _connect(server):
    import inspect

    client = openai.AsyncOpenAI(
        api_key="not-needed", base_url=f"{server.url}/v1", websocket_base_url=f"ws://127.0.0.1:{server.port}/v1"
    )
    retries = {"max_retries": 0} if "max_retries" in inspect.signature(client.realtime.connect).parameters else {}
    return client.realtime.connect(model="tiny", **retries)


async def _until(conn, kind: str) -> list:
    events = []
    while True:
        event = await asyncio.wait_for(conn.recv(), 120)
        events.append(event)
        if event.type in (kind, "error"):
            return events


async def _update(conn, **session):
    await conn.send({"type": "session.update", "session": {"type": "realtime", **session}})
    return (await _until(conn, "session.updated"))[-1]


async def _reply_audio(conn, **response) -> bytes:
    await conn.send({"type": "response.create", **({"response": response} if response else {})})
    events = await _until(conn, "response.done")
    assert events[-1].type == "response.done", events[-1]
    return b"".join(base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta")


async def _one_reply(server, session_voice=None, response_voice=None):
    """A fresh session asked "Hi there": the session.updated event after choosing ``session_voice`` and the reply's
    audio (with ``response_voice`` as the response's own voice when given)."""
    async with _connect(server) as conn:
        assert (await conn.recv()).type == "session.created"
        session = {"instructions": "Be brief.", "max_output_tokens": 10, "audio": {"input": {"turn_detection": None}}}
        if session_voice:
            session["audio"]["output"] = {"voice": session_voice}
        updated = await _update(conn, **session)
        await conn.send(
            {
                "type": "conversation.item.create",
                "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi there"}]},
            }
        )
        await _until(conn, "conversation.item.done")
        response = {"audio": {"output": {"voice": response_voice}}} if response_voice else {}
        return updated, await _reply_audio(conn, **response)


def test_realtime_voices_speak_the_chat_completions_reply(server):
    updated, in_anna = asyncio.run(_one_reply(server, session_voice="anna"))
    _, override = asyncio.run(_one_reply(server, session_voice="anna", response_voice="default"))
    assert updated.session.audio.output.voice == "anna"
    client = server.client()
    assert in_anna == spoken(client, "anna")  # the same greedy reply bytes through both APIs
    assert override == spoken(client, "default") != in_anna


def test_realtime_unknown_voices_are_error_events_and_change_nothing(server):
    async def run():
        async with _connect(server) as conn:
            assert (await conn.recv()).type == "session.created"
            await _update(conn, audio={"output": {"voice": "anna"}})
            refused = await _update(conn, audio={"output": {"voice": "bob"}})
            kept = await _update(conn, instructions="Be brief.")
            await conn.send({"type": "response.create", "response": {"audio": {"output": {"voice": "eve"}}}})
            refused_response = (await _until(conn, "response.done"))[-1]
            return refused, kept, refused_response

    refused, kept, refused_response = asyncio.run(run())
    assert refused.type == "error" and refused.error.param == "session.audio.output.voice"
    assert "unknown voice 'bob'; available voices: default, anna, 中文女." in refused.error.message
    assert kept.session.audio.output.voice == "anna"  # the refused update changed nothing
    assert refused_response.type == "error" and refused_response.error.param == "response.audio.output.voice"
    assert "unknown voice 'eve'" in refused_response.error.message


def test_serve_voice_flags_build_the_registry(tmp_path, voices):
    from fun_audio_chat.cli import CLIError, _serve_voices
    from fun_audio_chat.tiny import tiny_detokenizer

    anna, _ = voices
    anna.save(tmp_path / "anna.safetensors")
    sf.write(tmp_path / "bert.wav", speech_like(3.0, 220), 16000)
    detokenizer = tiny_detokenizer()
    args = argparse.Namespace(
        detokenizer=None,
        voice=[f"dora={tmp_path / 'anna.safetensors'}", f"bert={tmp_path / 'bert.wav'}"],
        voice_encoders=None,
    )
    registry = _serve_voices(args, detokenizer)
    assert registry.names == ["default", "dora", "bert"]
    assert torch.equal(registry.get("dora").prompt_mel, anna.prompt_mel) and registry.get("bert").has_prompt
    saved = tmp_path / "converted"
    detokenizer.save_pretrained(saved)
    (saved / "voices").mkdir()
    anna.save(saved / "voices" / "anna.safetensors")
    folder_args = argparse.Namespace(detokenizer=str(saved), voice=None, voice_encoders=None, chunked_synthesis=True)
    assert _serve_voices(folder_args, detokenizer).names == ["default", "anna"]  # prompts encoded up front
    for bad, message in (
        ("nobody", "expected NAME=CLIP_OR_VOICE_FILE"),
        (f"x={tmp_path / 'missing.wav'}", "not found"),
    ):
        with pytest.raises(CLIError, match=message):
            _serve_voices(argparse.Namespace(detokenizer=None, voice=[bad], voice_encoders=None), detokenizer)
    with pytest.raises(CLIError, match="--voice-encoders .*no campplus.onnx"):
        clip_args = argparse.Namespace(
            detokenizer=str(saved), voice=[f"b={tmp_path / 'bert.wav'}"], voice_encoders=None
        )
        _serve_voices(clip_args, detokenizer)
    with pytest.raises(CLIError, match="no detokenizer"):
        _serve_voices(argparse.Namespace(detokenizer="none", voice=["a=b"], voice_encoders=None), None)
