"""The official ``openai`` client against ``create_app`` served on 127.0.0.1: text replies, streaming, tools,
concurrent requests equal to their solo answers, bad requests answered with 4xx JSON errors, disconnects."""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile as sf

from fun_audio_chat.serving import ServingEngine

from .conftest import LocalServer, ScriptedReply, tiny_detokenizer_or_none

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow

TOOL_REPLY = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def server(tiny_pair):
    model, processor = tiny_pair
    detokenizer = tiny_detokenizer_or_none()
    assert detokenizer is not None, "fun_audio_chat.tiny.tiny_detokenizer is missing"
    engine = ServingEngine(model, processor, detokenizer, max_batch_size=8, batch_window=0.3)
    with LocalServer(engine, "tiny", default_max_tokens=12, max_audio_seconds=30) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def _spoken(b64: str, text: str | None = None) -> list[dict]:
    content = [{"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}}]
    if text:
        content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"


def test_text_reply_streamed_equals_non_streamed(client, hello_b64):
    messages = _spoken(hello_b64, "Answer briefly.")
    reply = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=10)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length" and reply.usage.completion_tokens == 10
    assert reply.usage.prompt_tokens > 20

    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        temperature=0,
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed


def test_multi_turn_history_and_system_prompt(client, hello_b64):
    first = client.chat.completions.create(model="tiny", messages=_spoken(hello_b64), temperature=0, max_tokens=6)
    messages = (
        [{"role": "system", "content": "You are terse."}]
        + _spoken(hello_b64)
        + [
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "And tomorrow?"},
        ]
    )
    second = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=6)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 5
    assert second.choices[0].message.content


def _audio_of(message) -> tuple[np.ndarray, int]:
    return sf.read(io.BytesIO(base64.b64decode(message.audio.data)), dtype="int16")


def test_spoken_reply_wav_and_stream_agree(client, hello_b64):
    messages = _spoken(hello_b64)
    reply = client.chat.completions.create(
        model="tiny",
        messages=messages,
        modalities=["text", "audio"],
        audio={"voice": "alloy", "format": "wav"},
        temperature=0,
        max_tokens=12,
    )
    message = reply.choices[0].message
    assert message.content is None and message.audio.transcript and message.audio.id.startswith("audio_")
    samples, rate = _audio_of(message)
    assert rate == 24000 and samples.ndim == 1
    assert 1.5 <= len(samples) / rate <= 3.0  # 12 steps, 5 codes (0.2 s) each after the speech delay
    assert np.abs(samples).max() > 0

    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        modalities=["text", "audio"],
        audio={"voice": "alloy", "format": "pcm16"},
        temperature=0,
        max_tokens=12,
        stream=True,
    )
    pieces, transcript = [], []
    for chunk in stream:
        audio = getattr(chunk.choices[0].delta, "audio", None) if chunk.choices else None
        if audio is not None:
            audio = audio if isinstance(audio, dict) else audio.model_dump()  # typed in recent openai releases
            if audio.get("data"):
                pieces.append(base64.b64decode(audio["data"]))
            transcript.append(audio.get("transcript") or "")
    assert len(pieces) >= 2  # audio came in pieces, not at the end
    assert np.array_equal(np.frombuffer(b"".join(pieces), dtype="<i2"), samples)
    assert "".join(transcript) == message.audio.transcript

    raw = client.chat.completions.create(
        model="tiny",
        messages=messages,
        modalities=["text", "audio"],
        audio={"voice": "alloy", "format": "pcm16"},
        temperature=0,
        max_tokens=12,
    )
    assert np.array_equal(np.frombuffer(base64.b64decode(raw.choices[0].message.audio.data), dtype="<i2"), samples)

    # the next turn refers to the spoken reply by its audio id, as OpenAI clients do
    follow_up = messages + [
        {"role": "assistant", "audio": {"id": message.audio.id}},
        {"role": "user", "content": "And tomorrow?"},
    ]
    again = client.chat.completions.create(
        model="tiny",
        messages=follow_up,
        modalities=["text", "audio"],
        audio={"voice": "alloy", "format": "wav"},
        temperature=0,
        max_tokens=4,
    )
    assert again.usage.prompt_tokens > reply.usage.prompt_tokens + len(message.audio.transcript) // 8


def test_four_concurrent_requests_equal_their_solo_answers(server, client, hello_b64):
    requests = [
        _spoken(hello_b64),
        [{"role": "user", "content": "What is the weather like in Paris?"}],
        _spoken(hello_b64, "One word."),
        [{"role": "user", "content": "Hi"}],
    ]

    def ask(messages, modalities):
        reply = client.chat.completions.create(
            model="tiny",
            messages=messages,
            temperature=0,
            max_tokens=10,
            modalities=modalities,
            audio={"voice": "alloy", "format": "wav"} if "audio" in modalities else None,
        )
        message = reply.choices[0].message
        return (message.audio.transcript, _audio_of(message)[0]) if message.audio else message.content

    for modalities in (["text"], ["text", "audio"]):
        solo = [ask(messages, modalities) for messages in requests]
        server.engine.batch_window = 2.0  # a busy machine may take a while to parse four audio requests
        try:
            with ThreadPoolExecutor(4) as pool:
                together = list(pool.map(ask, requests, [modalities] * 4))
        finally:
            server.engine.batch_window = 0.3
        if modalities == ["text"]:
            assert together == solo
        else:
            assert [transcript for transcript, _ in together] == [transcript for transcript, _ in solo]
            # one batched synthesis call for the four replies: each equals its solo audio within fp32 rounding
            # (at most one 16-bit step apart)
            for (_, audio), (_, alone) in zip(together, solo):
                assert audio.shape == alone.shape and np.abs(audio.astype(int) - alone.astype(int)).max() <= 1
        turns = server.app.state.metrics.summary()["recent_turns"]
        assert [turn["batch_size"] for turn in turns[-4:]] == [4, 4, 4, 4]  # decoded as one batch


def test_seed_repeats_a_sampled_reply(client):
    messages = [{"role": "user", "content": "Tell me something."}]

    def ask(seed):
        return (
            client.chat.completions.create(
                model="tiny", messages=messages, temperature=1.0, top_p=0.9, seed=seed, max_tokens=10
            )
            .choices[0]
            .message.content
        )

    assert ask(7) == ask(7)
    assert ask(7) != ask(8)


def test_tools_reach_the_prompt_and_come_back_as_tool_calls(tiny_pair):
    from transformers import LogitsProcessorList

    model, processor = tiny_pair
    script = processor.tokenizer.encode("Let me check." + TOOL_REPLY, add_special_tokens=False)
    script.append(processor.im_end_token_id)

    engine = ServingEngine(
        model, processor, generate_kwargs={"logits_processor": LogitsProcessorList([ScriptedReply(script)])}
    )
    with LocalServer(engine, "tiny") as server:
        client = server.client()
        messages = [{"role": "user", "content": "What is the weather in Paris?"}]
        reply = client.chat.completions.create(
            model="tiny", messages=messages, tools=[WEATHER_TOOL], temperature=0, max_tokens=len(script) + 4
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content == "Let me check."
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"}
        assert reply.usage.prompt_tokens > 60  # the tool schema is in the prompt

        stream = client.chat.completions.create(
            model="tiny",
            messages=messages,
            tools=[WEATHER_TOOL],
            temperature=0,
            max_tokens=len(script) + 4,
            stream=True,
        )
        chunks = [c for c in stream if c.choices]
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Let me check."
        streamed_calls = [call for c in chunks for call in (c.choices[0].delta.tool_calls or [])]
        assert [(c.function.name, json.loads(c.function.arguments)) for c in streamed_calls] == [
            ("get_weather", {"city": "Paris"})
        ]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"

        # the tool result goes back in, as OpenAI clients send it
        follow_up = messages + [
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sky": "sunny"})},
        ]
        again = client.chat.completions.create(
            model="tiny", messages=follow_up, tools=[WEATHER_TOOL], temperature=0, max_tokens=4
        )
        assert again.usage.prompt_tokens > reply.usage.prompt_tokens + 10
        # tool_choice "none" leaves the tools out of the prompt
        plain = client.chat.completions.create(
            model="tiny", messages=messages, tools=[WEATHER_TOOL], tool_choice="none", temperature=0, max_tokens=4
        )
        assert plain.usage.prompt_tokens < reply.usage.prompt_tokens


def _post(server, body, raw: bytes | None = None, headers=None):
    import httpx2 as httpx

    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(
        f"{server.url}/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json", **(headers or {})},
        timeout=60,
    )


def _bad(server, body=None, raw=None, status=400) -> str:
    response = _post(server, body, raw)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    return error["message"]


def test_bad_requests_get_4xx_json_errors_and_the_server_keeps_serving(server, client, hello_b64, tmp_path):
    import numpy as np
    import soundfile as sf

    ok = {"model": "tiny", "messages": _spoken(hello_b64), "max_tokens": 4}

    def audio_part(data, fmt="wav"):
        return {
            "model": "tiny",
            "max_tokens": 4,
            "messages": [
                {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": data, "format": fmt}}]}
            ],
        }

    assert "not valid JSON" in _bad(server, raw=b'{"model": "tiny", "messages": [')
    assert "'temperatur'" in _bad(server, {**ok, "temperatur": 0})
    assert "missing required field 'messages'" in _bad(server, {"model": "tiny"})
    assert "not valid base64" in _bad(server, audio_part("%%% not base64 %%%"))
    message = _bad(server, audio_part(base64.b64encode(b"definitely not audio").decode()))
    assert "could not decode" in message and "wav" in message
    assert "path or URL" in _bad(server, audio_part("/etc/passwd"))
    assert "path or URL" in _bad(server, audio_part("https://example.com/a.wav"))
    assert "format 'aac'" in _bad(server, audio_part(hello_b64, "aac"))
    long_clip = tmp_path / "long.wav"
    sf.write(long_clip, np.zeros(16000 * 31, dtype=np.float32), 16000)
    assert "longer than this server's limit of 30 s" in _bad(
        server, audio_part(base64.b64encode(long_clip.read_bytes()).decode())
    )
    path_part = {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "audio", "path": "/etc/passwd"}]}]}
    assert "content type 'audio' is not supported" in _bad(server, path_part)
    url_part = {
        "model": "tiny",
        "messages": [
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {"url": "file:///etc/passwd"}}]}
        ],
    }
    assert "paths and URLs are refused" in _bad(server, url_part)
    assert "not served here" in _bad(server, {**ok, "model": "gpt-4o-audio-preview"}, status=404)
    assert "exceeds the model's context" in _bad(server, {**ok, "max_tokens": 5000})
    assert "n is not supported" in _bad(server, {**ok, "n": 2})
    assert "format 'wav' is not available for streamed" in _bad(
        server, {**ok, "stream": True, "modalities": ["text", "audio"], "audio": {"voice": "x", "format": "wav"}}
    )
    assert "format 'mp3' is not available" in _bad(
        server, {**ok, "modalities": ["text", "audio"], "audio": {"voice": "x", "format": "mp3"}}
    )
    assert "modalities does not include 'audio'" in _bad(server, {**ok, "audio": {"voice": "x", "format": "wav"}})
    assert "role 'robot'" in _bad(server, {**ok, "messages": [{"role": "robot", "content": "hi"}]})
    assert "at least one user message" in _bad(server, {**ok, "messages": [{"role": "system", "content": "x"}]})
    assert "audio.id" in _bad(
        server,
        {
            **ok,
            "messages": _spoken(hello_b64)
            + [{"role": "assistant", "audio": {"id": "audio_unknown"}}, {"role": "user", "content": "and?"}],
        },
    )

    assert "content 'str'" not in _bad(server, path_part)  # union members' labels stay out of the location
    assert "messages.0.content.0: content type 'audio'" in _bad(server, path_part)
    assert "messages.0.name: Input should be a valid string" in _bad(
        server, {**ok, "messages": [{"role": "user", "content": "hi", "name": 3}]}
    )
    # the accepted shapes are in the OpenAPI document, one schema per role and content part
    import httpx2 as httpx

    schemas = httpx.get(f"{server.url}/openapi.json").json()["components"]["schemas"]
    assert {"UserMessage", "AssistantMessage", "ToolMessage", "SystemMessage", "InputAudioPart", "TextPart"} <= set(
        schemas
    )
    assert schemas["InputAudio"]["additionalProperties"] is False

    with pytest.raises(openai.BadRequestError, match="unknown field 'frequency'"):
        client.chat.completions.create(model="tiny", messages=ok["messages"], extra_body={"frequency": 1})
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4o-audio-preview", messages=ok["messages"])

    # after all that, the server still answers, and counted the bad requests
    assert client.chat.completions.create(model="tiny", messages=ok["messages"], max_tokens=3).choices[0]
    assert server.app.state.metrics.summary()["counters"]["bad_requests"] >= 18


def test_oversized_body_and_speech_without_detokenizer_are_refused(tiny_pair):
    model, processor = tiny_pair
    with LocalServer(ServingEngine(model, processor), "tiny", max_body_bytes=1000) as small:
        response = _post(small, {"model": "tiny", "messages": [{"role": "user", "content": "x" * 2000}]})
        assert response.status_code == 413 and "larger than this server's limit" in response.json()["error"]["message"]
        spoken = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "modalities": ["text", "audio"]}
        assert "cannot answer with audio" in _bad(small, spoken)
        assert small.client().chat.completions.create(model="tiny", messages=spoken["messages"], max_tokens=2)


def test_disconnected_client_frees_its_row(server, client, monkeypatch):
    import httpx2 as httpx

    from fun_audio_chat.modeling.continuous_batching import ContinuousBatchDecoder

    # A 900-token tiny reply takes about 2 s unloaded; on a loaded CI machine it could end before the disconnect is
    # seen, and an ended turn has nothing to cancel. Slowing every step keeps the turn running for many seconds.
    step = ContinuousBatchDecoder.step

    def slow_step(decoder):
        time.sleep(0.02)
        return step(decoder)

    monkeypatch.setattr(ContinuousBatchDecoder, "step", slow_step)
    metrics = server.app.state.metrics
    before = metrics.summary()["counters"]["turns_cancelled"]
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "A long story, please."}],
        "temperature": 0,
        "max_tokens": 900,
        "stream": True,
    }
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                break  # leave after the first piece of text
    deadline = time.monotonic() + 30
    while metrics.summary()["counters"]["turns_cancelled"] == before:
        assert time.monotonic() < deadline, "the server never noticed the disconnect"
        time.sleep(0.1)
    cancelled = [turn for turn in metrics.summary()["recent_turns"] if turn["finish_reason"] == "cancelled"][-1]
    assert cancelled["completion_tokens"] < 900  # generation stopped early
    assert client.chat.completions.create(model="tiny", messages=body["messages"], max_tokens=3).choices[0]


def test_metrics_endpoint(server, client):
    import httpx2 as httpx

    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    text = httpx.get(f"{server.url}/metrics").text
    assert "# TYPE fun_audio_chat_turn_first_text_seconds histogram" in text
    assert 'fun_audio_chat_turn_first_text_seconds_bucket{le="+Inf"}' in text
    assert "fun_audio_chat_turns_completed_total" in text
    data = httpx.get(f"{server.url}/metrics", params={"format": "json"}).json()
    assert data["summaries"]["first_text_seconds"]["count"] >= 1
    turn = data["recent_turns"][-1]
    assert turn["first_text_seconds"] <= turn["total_seconds"]
    assert httpx.get(f"{server.url}/metrics", params={"format": "xml"}).status_code == 400
