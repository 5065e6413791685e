"""The Realtime API (``/v1/realtime``) driven by the real ``openai`` SDK against ``create_app`` on 127.0.0.1: a
server-VAD turn from streamed speech, a manual turn, a typed text turn, barge-in, a tool call round trip, hostile
input, idle and vanished clients, four concurrent sessions, and the latency split in ``/metrics``."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import inspect
import json
import subprocess
import sys
import time

import numpy as np
import pytest

from fun_audio_chat.serving import ServingEngine
from fun_audio_chat.serving.realtime import RealtimeLimits

from .conftest import LocalServer, ScriptedReply, tiny_detokenizer_or_none

openai = pytest.importorskip("openai")
pytest.importorskip("websockets", reason="the Realtime tests need openai[realtime] (websockets<18)")
if importlib.util.find_spec("silero_vad") is None:  # not imported here: importing it sets torch to 1 thread
    pytest.skip("server-side turn detection needs silero-vad", allow_module_level=True)

RATE = 24000
CHUNK = RATE // 10  # 100 ms appends, as a microphone client sends them
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TOOL_REPLY = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def server(tiny_pair):
    model, processor = tiny_pair
    detokenizer = tiny_detokenizer_or_none()
    assert detokenizer is not None, "fun_audio_chat.tiny.tiny_detokenizer is missing"
    engine = ServingEngine(model, processor, detokenizer, batch_window=0.05)
    with LocalServer(engine, "tiny", default_max_tokens=12) as running:
        yield running


@pytest.fixture(scope="module")
def strict_server(tiny_pair):
    """Small limits, to reach them quickly."""
    model, processor = tiny_pair
    limits = RealtimeLimits(
        max_event_bytes=64_000, max_buffer_seconds=2.0, idle_timeout_seconds=1.0, max_output_tokens=4
    )
    engine = ServingEngine(model, processor, tiny_detokenizer_or_none(), batch_window=0.0)
    with LocalServer(engine, "tiny", realtime_limits=limits) as running:
        yield running


@pytest.fixture(scope="module")
def speech_pcm() -> bytes:
    """The package's spoken example at 24 kHz PCM16: 0.5 s of silence, the speech (3.4 s), 1.5 s of silence."""
    import soundfile as sf

    from fun_audio_chat.processing import example_audio_path, resample

    waveform, rate = sf.read(example_audio_path(), dtype="float32")
    speech = resample(waveform, rate, RATE)
    silence = np.zeros(RATE // 2, dtype=np.float32)
    audio = np.concatenate([silence, speech, silence, silence, silence])
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def connect(server, model: str = "tiny"):
    client = openai.AsyncOpenAI(
        api_key="not-needed", base_url=f"{server.url}/v1", websocket_base_url=f"ws://127.0.0.1:{server.port}/v1"
    )
    # newer SDKs reconnect on their own; a closed session must stay closed in these tests
    retries = {"max_retries": 0} if "max_retries" in inspect.signature(client.realtime.connect).parameters else {}
    return client.realtime.connect(model=model, **retries)


async def recv_until(conn, kind: str, timeout: float = 120.0, stop_on_error: bool = True) -> list:
    """Events up to and including the first of type ``kind``."""
    events = []
    deadline = time.monotonic() + timeout
    while True:
        event = await asyncio.wait_for(conn.recv(), max(0.1, deadline - time.monotonic()))
        events.append(event)
        if event.type == kind:
            return events
        if stop_on_error and event.type == "error":
            raise AssertionError(f"error event while waiting for {kind}: {event.error}")


async def stream_audio(conn, pcm: bytes) -> None:
    for start in range(0, len(pcm), CHUNK * 2):
        await conn.send(
            {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[start : start + CHUNK * 2]).decode()}
        )


async def setup(conn, **session) -> None:
    created = await conn.recv()
    assert created.type == "session.created"
    if session:
        await conn.send({"type": "session.update", "session": {"type": "realtime", **session}})
        await recv_until(conn, "session.updated")


async def say(conn, text: str) -> None:
    """A typed user turn: one ``conversation.item.create`` with an ``input_text`` part."""
    await conn.send(
        {
            "type": "conversation.item.create",
            "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]},
        }
    )


def reply_of(events) -> dict:
    """Text, transcript, audio bytes and the final response of one response's events."""
    audio = b"".join(base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta")
    return {
        "text": "".join(e.delta for e in events if e.type == "response.output_text.delta"),
        "transcript": "".join(e.delta for e in events if e.type == "response.output_audio_transcript.delta"),
        "audio": audio,
        "audio_deltas": sum(e.type == "response.output_audio.delta" for e in events),
        "done": next(e for e in events if e.type == "response.done").response,
    }


def engine_reply(server, messages, speech: bool, max_new_tokens: int) -> str:
    from fun_audio_chat.serving import TurnRequest

    handle = server.engine.submit(TurnRequest(messages=messages, speech=speech, max_new_tokens=max_new_tokens))
    return handle.result().text


def wait_until(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------------ turns
def test_silero_detector_finds_one_turn_whatever_the_piece_sizes(speech_pcm):
    from fun_audio_chat.processing import resample
    from fun_audio_chat.serving.vad import SpeechStarted, SpeechStopped, SpeechTurnDetector

    audio = resample(np.frombuffer(speech_pcm, dtype="<i2").astype(np.float32) / 32768, RATE, 16000)
    detector = SpeechTurnDetector(threshold=0.5, silence_duration_ms=500)
    whole = detector.feed(audio)
    assert [type(event) for event in whole] == [SpeechStarted, SpeechStopped]  # the pause inside is not an end
    assert 0.3 < whole[0].sample / 16000 < 1.0 and 3.4 < whole[1].sample / 16000 < 4.2
    detector.reset()
    rng = np.random.default_rng(0)
    pieces, start = [], 0
    while start < len(audio):
        size = int(rng.integers(1, 3000))
        pieces += detector.feed(audio[start : start + size])
        start += size
    assert [(type(e), e.sample) for e in pieces] == [(type(e), e.sample) for e in whole]
    # a short silence threshold splits the clip at its inner pause
    assert len(SpeechTurnDetector(silence_duration_ms=100, model=detector.model).feed(audio)) == 4


@pytest.mark.slow
def test_silero_runs_single_threaded_and_leaves_torchs_thread_count_alone():
    """silero's tiny per-frame operations crawl with several torch threads on busy cores, and ``import silero_vad``
    sets 1 thread for the process, which would halve decoding speed: the detector runs on its own 1-thread worker
    and every other thread, old or new, keeps the process's setting."""
    script = """
import threading, numpy as np, torch
torch.set_num_threads(2)
from fun_audio_chat.serving.vad import SpeechTurnDetector, vad_worker
detector = SpeechTurnDetector()
detector.feed(np.zeros(16000, dtype=np.float32))
seen = {}
threading.Thread(target=lambda: seen.update(new=torch.get_num_threads())).start()
while "new" not in seen: pass
worker = vad_worker().submit(torch.get_num_threads).result()
assert (torch.get_num_threads(), seen["new"], worker) == (2, 2, 1), (torch.get_num_threads(), seen, worker)
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)


def test_vad_commit_keeps_the_prefix_padding_and_silence_does_not_grow_the_buffer(tiny_pair, speech_pcm):
    """The buffer arithmetic of server VAD, on a session without a server: the committed item holds the speech plus
    ``prefix_padding_ms`` before it, cut at the end of speech; outside speech the buffer stays small."""
    from fun_audio_chat.processing import resample
    from fun_audio_chat.serving.realtime import RealtimeSession

    _, processor = tiny_pair

    class NoEngine:
        can_speak, sample_rate = False, None

        def __init__(self):
            self.processor = processor

    class Socket:
        scope, query_params = {"subprotocols": []}, {}

    async def run():
        session = RealtimeSession(Socket(), NoEngine(), model_id="tiny")
        vad = {"type": "server_vad", "prefix_padding_ms": 200, "create_response": False}
        update = {
            "type": "session.update",
            "session": {"type": "realtime", "audio": {"input": {"turn_detection": vad}}},
        }
        await session.handle_text(json.dumps(update))
        silence = base64.b64encode(bytes(CHUNK * 2)).decode()
        for _ in range(30):  # 3 s of silence first
            await session.handle_text(json.dumps({"type": "input_audio_buffer.append", "audio": silence}))
            assert session._buffer_samples <= 16000 * 0.2 + 1024 + 1600  # only the prefix padding is kept
        for start in range(0, len(speech_pcm), CHUNK * 2):
            piece = base64.b64encode(speech_pcm[start : start + CHUNK * 2]).decode()
            await session.handle_text(json.dumps({"type": "input_audio_buffer.append", "audio": piece}))
        events = []
        while not session._outbox.empty():
            events.append(session._outbox.get_nowait())
        return session, events

    session, events = asyncio.run(run())
    kinds = [event["type"] for event in events]
    assert "error" not in kinds and not any(kind.startswith("response.") for kind in kinds)  # create_response off
    started = next(event for event in events if event["type"] == "input_audio_buffer.speech_started")
    stopped = next(event for event in events if event["type"] == "input_audio_buffer.speech_stopped")
    assert 3300 <= started["audio_start_ms"] <= 4100  # after the 3 s of silence and the clip's own 0.5 s lead
    (item,) = session.items
    audio = item.parts[0]["audio"]
    expected = (stopped["audio_end_ms"] - started["audio_start_ms"] + 200) * 16
    assert abs(len(audio) - expected) <= 32  # millisecond rounding of the event positions
    # it is the user's audio: the same samples as resampling the whole stream at once, from that position
    whole = resample(np.frombuffer(speech_pcm, dtype="<i2").astype(np.float32) / 32768, RATE, 16000)
    offset = (started["audio_start_ms"] - 200 - 3000) * 16
    reference = whole[offset : offset + len(audio)]
    assert np.corrcoef(audio[: len(reference)], reference)[0, 1] > 0.99


def test_server_vad_turn_from_speech_streamed_in_100ms_chunks(server, speech_pcm):
    async def run():
        async with connect(server) as conn:
            created = await conn.recv()
            assert created.session.audio.input.turn_detection.type == "server_vad"  # OpenAI's default
            assert created.session.output_modalities == ["audio"]
            await conn.send(
                {
                    "type": "session.update",
                    "session": {
                        "type": "realtime",
                        "instructions": "Answer briefly.",
                        "audio": {
                            "input": {
                                "format": {"type": "audio/pcm", "rate": 24000},
                                "turn_detection": {"type": "server_vad", "silence_duration_ms": 500},
                            },
                            "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "marin"},
                        },
                    },
                }
            )
            updated = (await recv_until(conn, "session.updated"))[-1]
            assert updated.session.instructions == "Answer briefly." and updated.session.audio.output.voice == "marin"
            await stream_audio(conn, speech_pcm)
            return await recv_until(conn, "response.done")

    events = asyncio.run(run())
    kinds = [e.type for e in events]
    # the order a voice agent relies on
    order = [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "response.created",
        "response.output_item.added",
        "response.output_audio.delta",
        "response.output_audio.done",
        "response.output_audio_transcript.done",
        "response.output_item.done",
        "response.done",
    ]
    positions = [kinds.index(kind) for kind in order]
    assert positions == sorted(positions), kinds
    # silero found the speech of hello.wav (0.5 s of silence, then 3.4 s with a short pause inside it)
    started = next(e for e in events if e.type == "input_audio_buffer.speech_started")
    stopped = next(e for e in events if e.type == "input_audio_buffer.speech_stopped")
    assert 300 <= started.audio_start_ms <= 1100, started
    assert 3300 <= stopped.audio_end_ms <= 4300, stopped  # one turn: the pause inside the clip did not end it
    assert kinds.count("input_audio_buffer.speech_started") == 1
    committed = next(e for e in events if e.type == "input_audio_buffer.committed")
    assert committed.item_id == stopped.item_id == started.item_id
    user_item = next(e for e in events if e.type == "conversation.item.added").item
    assert user_item.role == "user" and user_item.content[0].type == "input_audio"

    reply = reply_of(events)
    assert reply["audio_deltas"] >= 2  # streamed in pieces, not at the end
    assert len(reply["audio"]) > 0 and len(reply["audio"]) % 2 == 0
    assert reply["transcript"]
    done = reply["done"]
    assert done.status == "incomplete" and done.status_details.reason == "max_output_tokens"  # 12 tokens
    assert done.usage.output_tokens == 12 and done.usage.input_tokens > 40  # the audio is in the prompt
    (message,) = done.output
    assert message.content[0].transcript == reply["transcript"]
    transcript_done = next(e for e in events if e.type == "response.output_audio_transcript.done")
    assert transcript_done.transcript == reply["transcript"]

    latency = server.app.state.metrics.summary()["realtime"]["latency"]
    assert latency["vad_wait"]["count"] >= 1 and latency["turn_end_to_first_audio"]["count"] >= 1
    assert 0 < latency["vad_wait"]["median"] < 5


def test_manual_turn_commit_then_response_create_and_cancel(server, speech_pcm):
    async def run():
        async with connect(server) as conn:
            await setup(conn, audio={"input": {"turn_detection": None}}, max_output_tokens=6)
            await stream_audio(conn, speech_pcm)
            await conn.send({"type": "input_audio_buffer.commit"})
            commit_events = await recv_until(conn, "conversation.item.done")
            await conn.send({"type": "response.create"})
            first = await recv_until(conn, "response.done")
            # a second turn, typed, sees the first one in its prompt
            await say(conn, "More?")
            await conn.send({"type": "response.create", "response": {"max_output_tokens": 400}})
            await recv_until(conn, "response.output_audio.delta")
            await conn.send({"type": "response.cancel"})
            await conn.send({"type": "response.create", "response": {"max_output_tokens": 2}})  # right after the cancel
            second = await recv_until(conn, "response.done")
            third = await recv_until(conn, "response.done")
            await conn.send({"type": "response.cancel"})  # nothing left to cancel
            error = await recv_until(conn, "error", stop_on_error=False)
            return commit_events, first, second, third, error[-1]

    commit_events, first, second, third, error = asyncio.run(run())
    assert not any(e.type.startswith("input_audio_buffer.speech") for e in commit_events)  # no VAD in manual mode
    assert commit_events[0].type == "input_audio_buffer.committed"
    first_reply = reply_of(first)
    assert first_reply["done"].usage.output_tokens == 6 and first_reply["audio_deltas"] >= 1
    done = reply_of(second)["done"]
    assert done.status == "cancelled" and done.status_details.reason == "client_cancelled"
    assert done.usage.input_tokens > first_reply["done"].usage.input_tokens + 5  # the history is in the prompt
    assert done.output[0].status == "incomplete"
    assert reply_of(third)["done"].usage.output_tokens == 2  # the new response waited for the cancelled one
    assert error.error.code == "response_cancel_not_active"
    # the cancelled row left the engine
    wait_until(lambda: not server.engine.busy.is_set() and server.engine.queue_depth() == 0, what="an idle engine")


def test_typed_text_item_gets_the_engines_text_reply(server):
    async def run():
        async with connect(server) as conn:
            await setup(conn, output_modalities=["text"], instructions="Be brief.", max_output_tokens=10)
            await say(conn, "Hi there")
            added = await recv_until(conn, "conversation.item.done")
            await conn.send({"type": "response.create"})
            return added, await recv_until(conn, "response.done")

    added, events = asyncio.run(run())
    assert added[0].item.content[0].text == "Hi there"
    reply = reply_of(events)
    assert reply["audio_deltas"] == 0 and not reply["transcript"]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi there"}]},
    ]
    # the session's instructions and item became exactly this conversation
    assert reply["text"] == engine_reply(server, messages, speech=False, max_new_tokens=10)
    assert reply["done"].output[0].content[0].text == reply["text"]
    assert reply["done"].output_modalities == ["text"]


def test_barge_in_cancels_the_reply_and_keeps_what_was_sent(server, speech_pcm):
    async def run():
        async with connect(server) as conn:
            await setup(conn, max_output_tokens=400)
            await stream_audio(conn, speech_pcm)
            before = await recv_until(conn, "response.output_audio.delta")
            await stream_audio(conn, speech_pcm)  # the user talks over the reply
            interrupted = await recv_until(conn, "response.done")
            next_turn = await recv_until(conn, "response.done")
            item_id = reply_of(before + interrupted)["done"].output[0].id
            await conn.send(
                {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0, "audio_end_ms": 0}
            )
            truncated = await recv_until(conn, "conversation.item.truncated")
            await conn.send(
                {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0, "audio_end_ms": 10**7}
            )
            beyond = await recv_until(conn, "error", stop_on_error=False)
            return before, interrupted, next_turn, truncated[-1], beyond[-1]

    before, interrupted, next_turn, truncated, beyond = asyncio.run(run())
    kinds = [e.type for e in interrupted]
    assert "input_audio_buffer.speech_started" in kinds
    assert kinds.index("input_audio_buffer.speech_started") < kinds.index("response.done")
    reply = reply_of(before + interrupted)
    done = reply["done"]
    assert done.status == "cancelled" and done.status_details.reason == "turn_detected"
    assert done.usage.output_tokens < 400  # generation stopped
    # the item keeps the audio that was sent: 0.2 s of speech per LLM step, far less than 400 steps' worth
    assert 0 < len(reply["audio"]) // 2 < 60 * RATE
    assert done.output[0].status == "incomplete"
    # nothing of the interrupted reply arrives after its response.done
    assert not [e for e in next_turn if getattr(e, "response_id", None) == done.id]
    # the interrupting speech became the next turn
    assert any(e.type == "input_audio_buffer.committed" for e in next_turn)
    assert reply_of(next_turn)["done"].status in ("completed", "incomplete")
    assert truncated.audio_end_ms == 0
    assert "beyond the item's audio" in beyond.error.message


@pytest.mark.parametrize("modality", ["text", "audio"])
def test_tool_call_round_trip(tiny_pair, modality):
    from transformers import LogitsProcessorList

    model, processor = tiny_pair
    script = processor.tokenizer.encode("Let me check." + TOOL_REPLY, add_special_tokens=False)
    script.append(processor.im_end_token_id)
    if modality == "audio":
        script.insert(0, script[0])  # spoken replies open with <|audio_bos|>, forced over the first step

    engine = ServingEngine(
        model,
        processor,
        tiny_detokenizer_or_none() if modality == "audio" else None,
        generate_kwargs={"logits_processor": LogitsProcessorList([ScriptedReply(script)])},
    )

    async def run(server):
        async with connect(server) as conn:
            await setup(conn, output_modalities=[modality], tools=[WEATHER_TOOL], max_output_tokens=len(script) + 4)
            await say(conn, "What is the weather in Paris?")
            await conn.send({"type": "response.create"})
            first = await recv_until(conn, "response.done")
            call = next(e for e in first if e.type == "response.function_call_arguments.done")
            await conn.send(
                {
                    "type": "conversation.item.create",
                    "item": {"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "sunny"}'},
                }
            )
            await conn.send({"type": "response.create", "response": {"max_output_tokens": 3}})
            second = await recv_until(conn, "response.done")
            await conn.send({"type": "response.create", "response": {"tool_choice": "none", "max_output_tokens": 3}})
            third = await recv_until(conn, "response.done")
            return first, second, third

    with LocalServer(engine, "tiny") as server:
        first, second, third = asyncio.run(run(server))
    reply = reply_of(first)
    said = reply["text"] if modality == "text" else reply["transcript"]
    assert said == "Let me check."  # the call is not part of the text
    assert (reply["audio_deltas"] > 0) == (modality == "audio")
    call = next(e for e in first if e.type == "response.function_call_arguments.done")
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    deltas = [e.delta for e in first if e.type == "response.function_call_arguments.delta"]
    assert "".join(deltas) == call.arguments
    done = reply["done"]
    assert done.status == "completed"
    assert [item.type for item in done.output] == ["message", "function_call"]
    assert done.output[1].call_id == call.call_id and done.usage.input_tokens > 60  # the schema is in the prompt
    # the call and the tool result went back into the prompt; tool_choice none leaves the schema out of it
    with_result = reply_of(second)["done"].usage.input_tokens
    assert with_result > done.usage.input_tokens + 20
    assert reply_of(third)["done"].usage.input_tokens < with_result - 20


# ------------------------------------------------------------------------------------------------ hostile input
def test_hostile_input_gets_error_events_and_the_session_goes_on(strict_server):
    async def run():
        async with connect(strict_server) as conn:
            await setup(conn, audio={"input": {"turn_detection": None}}, output_modalities=["text"])
            codes = {}

            async def expect_error(raw: str | None = None, event: dict | None = None) -> str:
                if raw is not None:
                    await conn.send_raw(raw)
                else:
                    await conn.send_raw(json.dumps(event))
                error = (await recv_until(conn, "error", stop_on_error=False))[-1].error
                codes.setdefault(error.code, []).append(error.message)
                return error.code

            assert await expect_error(raw='{"type": "session.update", ') == "invalid_json"
            assert await expect_error(event={"type": "response.explode"}) == "unknown_event_type"
            assert await expect_error(event=["not", "an", "object"]) == "invalid_event"
            assert await expect_error(event={"type": "input_audio_buffer.append", "audio": "%%% no base64 %%%"}) == (
                "invalid_base64"
            )
            assert await expect_error(event={"type": "input_audio_buffer.append", "audio": "AAAA"}) == "invalid_audio"
            big = base64.b64encode(bytes(60_000)).decode()
            assert await expect_error(event={"type": "input_audio_buffer.append", "audio": big}) == "event_too_large"
            assert (
                await expect_error(
                    event={"type": "session.update", "session": {"type": "realtime", "instructionz": "x"}}
                )
                == "invalid_request"
            )
            assert (
                await expect_error(
                    event={
                        "type": "session.update",
                        "session": {
                            "type": "realtime",
                            "audio": {"input": {"turn_detection": {"type": "semantic_vad"}}},
                        },
                    }
                )
                == "unsupported_turn_detection"
            )
            assert (
                await expect_error(
                    event={
                        "type": "session.update",
                        "session": {
                            "type": "realtime",
                            "audio": {"output": {"format": {"type": "audio/pcm", "rate": 16000}}},
                        },
                    }
                )
                == "invalid_request"
            )
            transcription = {"type": "realtime", "audio": {"input": {"transcription": {"model": "whisper-1"}}}}
            assert await expect_error(event={"type": "session.update", "session": transcription}) == "invalid_request"
            assert "not supported by this server" in codes["invalid_request"][-1]
            assert await expect_error(event={"type": "input_audio_buffer.commit"}) == "input_audio_buffer_commit_empty"
            assert await expect_error(event={"type": "response.create"}) == "conversation_empty"
            assert (
                await expect_error(event={"type": "conversation.item.delete", "item_id": "item_nope"})
                == "item_not_found"
            )
            # an append flood meets the bounded buffer (2 s here): an error, the extra audio is dropped
            half_second = base64.b64encode(bytes(RATE)).decode()  # 0.5 s of PCM16
            for _ in range(8):
                await conn.send({"type": "input_audio_buffer.append", "audio": half_second})
            flood = await recv_until(conn, "error", stop_on_error=False)
            codes.setdefault(flood[-1].error.code, []).append(flood[-1].error.message)
            await conn.send({"type": "input_audio_buffer.clear"})
            await recv_until(conn, "input_audio_buffer.cleared", stop_on_error=False)
            # after all that, the session still answers
            await say(conn, "Hi")
            # a reply that cannot fit the model's context fails with the reason, and the session goes on
            await conn.send({"type": "response.create", "response": {"max_output_tokens": 4000}})
            too_long = await recv_until(conn, "response.done", stop_on_error=False)
            assert reply_of(too_long)["done"].status == "failed"
            assert "exceeds the model's context" in reply_of(too_long)["done"].status_details.error.message
            assert any(e.type == "error" and e.error.code == "generation_failed" for e in too_long)
            await conn.send({"type": "response.create"})
            events = await recv_until(conn, "response.done", stop_on_error=False)
            return codes, events

    codes, events = asyncio.run(run())
    assert "commit or clear" in codes["input_audio_buffer_full"][0]
    assert "unknown field 'session.instructionz'" in codes["invalid_request"][0]
    assert "rate" in codes["invalid_request"][1]
    assert "unknown event type 'response.explode'" in codes["unknown_event_type"][0]
    assert "smaller appends" in codes["event_too_large"][0]
    assert "odd number" in codes["invalid_audio"][0]
    assert "not valid base64" in codes["invalid_base64"][0]
    assert reply_of(events)["done"].status in ("completed", "incomplete")
    assert strict_server.app.state.metrics.summary()["realtime"]["counters"]["error_events"] >= 13


def test_idle_client_is_closed_cleanly(strict_server):
    from websockets.exceptions import ConnectionClosedOK

    metrics = strict_server.app.state.metrics

    async def run():
        async with connect(strict_server) as conn:
            assert (await conn.recv()).type == "session.created"
            started = time.monotonic()
            error = await asyncio.wait_for(conn.recv(), 30)
            waited = time.monotonic() - started
            with pytest.raises(ConnectionClosedOK):
                await asyncio.wait_for(conn.recv(), 30)
            return error, waited

    before = metrics.summary()["realtime"]["counters"]["sessions_idle_closed"]
    error, waited = asyncio.run(run())
    assert error.type == "error" and error.error.code == "idle_timeout"
    assert 0.9 <= waited < 10
    wait_until(
        lambda: metrics.summary()["realtime"]["counters"]["sessions_idle_closed"] == before + 1, what="idle count"
    )
    wait_until(lambda: metrics.summary()["realtime"]["sessions_active"] == 0, what="no open session")


def test_idle_timeout_waits_for_a_streaming_reply(strict_server):
    async def run():
        async with connect(strict_server) as conn:
            await setup(conn)
            await say(conn, "Hi")
            started = time.monotonic()
            # 240 steps: a spoken reply of about 10 s, streamed for well over the 1 s idle timeout
            await conn.send({"type": "response.create", "response": {"max_output_tokens": 240}})
            events = await recv_until(conn, "response.done")
            return events, time.monotonic() - started

    events, seconds = asyncio.run(run())
    assert reply_of(events)["done"].usage.output_tokens == 240
    assert seconds > 1.0, "the reply was too short to test the idle timeout"


def test_a_client_that_does_not_read_is_closed_with_bounded_memory(tiny_pair):
    from fun_audio_chat.serving.realtime import RealtimeSession

    model, processor = tiny_pair

    class StuckSocket:
        """A client whose receive window is full: every send blocks."""

        scope = {"subprotocols": []}
        query_params = {}

        def __init__(self):
            self.closed_with = None

        async def accept(self, subprotocol=None):
            pass

        async def send_text(self, text):
            await asyncio.Event().wait()

        async def receive(self):
            await asyncio.Event().wait()

        async def close(self, code=1000, reason=""):
            self.closed_with = code

    async def run():
        socket = StuckSocket()
        engine = ServingEngine(model, processor)
        session = RealtimeSession(socket, engine, model_id="tiny", limits=RealtimeLimits(max_pending_events=50))
        task = asyncio.create_task(session.run())
        await asyncio.sleep(0.05)
        for _ in range(200):
            session.send("response.output_audio.delta", delta="AAAA")
        assert session._outbox.qsize() <= 50  # the unread events are bounded
        await asyncio.wait_for(task, 30)  # the session ends on its own
        return socket

    socket = asyncio.run(run())
    assert socket.closed_with in (None, 1008)  # the close frame may not get through a full window either


def test_wrong_model_is_refused(server):
    async def run():
        async with connect(server, model="gpt-realtime") as conn:
            return await conn.recv()

    event = asyncio.run(run())
    assert event.type == "error" and event.error.code == "model_not_found" and "'tiny'" in event.error.message


# ------------------------------------------------------------------------------------------------ load, leaks
@pytest.mark.slow
def test_four_concurrent_sessions_equal_their_solo_replies(server):
    prompts = ["Hi", "What is the weather like?", "Tell me a story.", "One word."]

    async def one(text: str) -> tuple[str, bytes]:
        async with connect(server) as conn:
            await setup(conn, audio={"input": {"turn_detection": None}}, max_output_tokens=8)
            await say(conn, text)
            await conn.send({"type": "response.create"})
            reply = reply_of(await recv_until(conn, "response.done"))
            return reply["transcript"], reply["audio"]

    async def together():
        return await asyncio.gather(*(one(text) for text in prompts))

    solo = [asyncio.run(one(text)) for text in prompts]
    concurrent = asyncio.run(together())
    assert [transcript for transcript, _ in concurrent] == [transcript for transcript, _ in solo]
    # greedy rows equal solo rows; their audio, synthesised in one batch, within fp32 rounding (one 16-bit step)
    for (_, audio), (_, alone) in zip(concurrent, solo):
        together_pcm, solo_pcm = np.frombuffer(audio, "<i2").astype(int), np.frombuffer(alone, "<i2").astype(int)
        assert together_pcm.shape == solo_pcm.shape and np.abs(together_pcm - solo_pcm).max() <= 1
    assert len({transcript for transcript, _ in solo}) > 1  # the prompts really differ


@pytest.mark.parametrize("leaving", ["close", "vanish"])
def test_client_leaving_mid_reply_frees_the_engine(server, leaving):
    metrics = server.app.state.metrics
    before = metrics.summary()["counters"]["turns_cancelled"]

    async def run():
        async with connect(server) as conn:
            await setup(conn, max_output_tokens=500)
            await say(conn, "A story.")
            await conn.send({"type": "response.create"})
            await recv_until(conn, "response.output_audio.delta")
            if leaving == "vanish":  # the network drops: no close frame, the TCP connection is reset
                conn._connection.transport.abort()
        # leaving the block closes the socket mid-reply

    asyncio.run(run())
    wait_until(lambda: metrics.summary()["counters"]["turns_cancelled"] > before, what="the cancelled turn")
    cancelled = [turn for turn in metrics.summary()["recent_turns"] if turn["finish_reason"] == "cancelled"][-1]
    assert cancelled["completion_tokens"] < 500
    wait_until(lambda: not server.engine.busy.is_set() and server.engine.queue_depth() == 0, what="an idle engine")
    wait_until(lambda: metrics.summary()["realtime"]["sessions_active"] == 0, what="no open session")


def test_realtime_latency_histograms_are_cumulative():
    from fun_audio_chat.serving.metrics import ServingMetrics

    metrics = ServingMetrics()
    for seconds in (0.04, 0.4, 4.0):
        metrics.record_realtime_turn("completed", {"queue_prefill": seconds, "vad_wait": None})
    metrics.record_realtime_turn("cancelled", {"queue_prefill": 20.0})
    text = metrics.prometheus()
    assert 'fun_audio_chat_realtime_queue_prefill_seconds_bucket{le="0.05"} 1.0' in text
    assert 'fun_audio_chat_realtime_queue_prefill_seconds_bucket{le="0.5"} 2.0' in text
    assert 'fun_audio_chat_realtime_queue_prefill_seconds_bucket{le="5.0"} 3.0' in text
    assert 'fun_audio_chat_realtime_queue_prefill_seconds_bucket{le="+Inf"} 4.0' in text
    assert "fun_audio_chat_realtime_queue_prefill_seconds_count 4.0" in text
    assert "fun_audio_chat_realtime_vad_wait_seconds_count 0.0" in text  # None is not an observation
    assert "fun_audio_chat_realtime_responses_cancelled_total 1.0" in text
    with pytest.raises(ValueError, match="unknown realtime latency field"):
        metrics.record_realtime_turn("completed", {"prefill": 0.1})


def test_metrics_show_the_realtime_latency_split(server):
    import httpx2 as httpx

    async def run():
        async with connect(server) as conn:
            await setup(conn, output_modalities=["audio"], max_output_tokens=4)
            await say(conn, "Hi")
            await conn.send({"type": "response.create"})
            await recv_until(conn, "response.done")

    asyncio.run(run())
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        "queue_prefill",
        "first_speech_group",
        "first_audio_chunk",
        "turn_end_to_first_audio",
        "turn_end_to_submit",
        "vad_wait",
    ):
        assert f"# TYPE fun_audio_chat_realtime_{name}_seconds histogram" in text
    assert 'fun_audio_chat_realtime_queue_prefill_seconds_bucket{le="+Inf"}' in text
    assert "fun_audio_chat_realtime_sessions_opened_total" in text
    data = httpx.get(f"{server.url}/metrics", params={"format": "json"}).json()["realtime"]
    turn = data["recent_turns"][-1]
    assert turn["vad_wait"] is None  # a typed turn waits for no turn detector
    assert turn["turn_end_to_first_audio"] >= turn["queue_prefill"] > 0
    assert data["counters"]["responses_completed"] + data["counters"]["responses_incomplete"] >= 1
