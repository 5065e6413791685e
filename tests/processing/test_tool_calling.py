"""Spoken function calling: tools in the chat template, tool-call parsing, tool results in multi-turn."""

from __future__ import annotations

import json

import pytest
import torch

from fun_audio_chat.processing import (
    DEFAULT_S2M_PROMPT,
    DEFAULT_S2T_PROMPT,
    StreamingToolCallParser,
    ToolCallParseError,
    parse_tool_calls,
)
from fun_audio_chat.processing.prompts import TOOLS_SECTION_FOOTER, TOOLS_SECTION_HEADER, render_tools_section
from fun_audio_chat.processing.tool_calling import strip_tool_calls, tool_calls_to_message

from .conftest import noise


def get_weather(city: str, unit: str = "celsius") -> dict:
    """Get the current weather in a city.

    Args:
        city: Name of the city.
        unit: Temperature unit, celsius or fahrenheit.
    """
    return {"city": city, "temp": 21, "unit": unit}


def set_alarm(time: str, label: str | None = None) -> str:
    """Set an alarm.

    Args:
        time: Time of day as HH:MM.
        label: Optional label.
    """
    return "ok"


WEATHER_SCHEMA = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "Name of the city."},
                "unit": {"type": "string", "description": "Temperature unit, celsius or fahrenheit."},
            },
            "required": ["city"],
        },
        "return": {"type": "object"},
    },
}


def _spoken_request(seed=0):
    return [
        {"role": "user", "content": [{"type": "audio", "audio": noise(24000, seed=seed), "sampling_rate": 16000}]},
    ]


def _expected_prompt(system: str, schemas: list[dict], n_audio: int) -> str:
    return (
        "<|im_start|>system\n" + system + render_tools_section(schemas) + "<|im_end|>\n"
        "<|im_start|>user\n<|audio_bos|>" + "<|AUDIO|>" * n_audio + "<|audio_eos|><|im_end|>\n"
        "<|im_start|>assistant\n"
    )


# --------------------------------------------------------------------------------------------- template
@pytest.mark.parametrize("tools", [[get_weather], [WEATHER_SCHEMA], [get_weather, set_alarm]])
def test_tool_prompt_layout_token_for_token(processor, tools):
    from transformers.utils import get_json_schema

    schemas = [t if isinstance(t, dict) else get_json_schema(t) for t in tools]
    out = processor.apply_chat_template(
        _spoken_request(), tools=tools, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    expected = _expected_prompt(DEFAULT_S2T_PROMPT, schemas, processor.num_audio_tokens(24000))
    assert out["input_ids"][0] == processor.tokenizer(expected)["input_ids"]
    text = processor.apply_chat_template(_spoken_request(), tools=tools, add_generation_prompt=True)
    # docs/official-format.md#prompt structure: S2T prompt, a "# Tools" section, one JSON signature per line inside <tools></tools>,
    # and the <tool_call>{"name": ..., "arguments": ...}</tool_call> reply format
    assert text.startswith(f"<|im_start|>system\n{DEFAULT_S2T_PROMPT}\n\n# Tools\n\n")
    block = text[text.index("<tools>\n") + len("<tools>\n") : text.index("\n</tools>")]
    assert [json.loads(line) for line in block.split("\n")] == schemas
    assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>' in text


def test_functions_and_schemas_render_the_same(processor):
    a = processor.apply_chat_template(_spoken_request(), tools=[get_weather], add_generation_prompt=True)
    b = processor.apply_chat_template(_spoken_request(), tools=[WEATHER_SCHEMA], add_generation_prompt=True)
    assert a == b


def test_tools_with_speech_output_or_own_system_prompt(processor):
    spoken = processor.apply_chat_template(
        _spoken_request(), tools=[WEATHER_SCHEMA], add_generation_prompt=True, speech_output=True
    )
    assert spoken.startswith("<|im_start|>system\n" + DEFAULT_S2M_PROMPT + TOOLS_SECTION_HEADER)
    own = processor.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, *_spoken_request()],
        tools=[WEATHER_SCHEMA],
        add_generation_prompt=True,
    )
    assert own.startswith("<|im_start|>system\nBe brief." + TOOLS_SECTION_HEADER)
    assert TOOLS_SECTION_FOOTER + "<|im_end|>\n" in own
    assert "# Tools" not in processor.apply_chat_template(_spoken_request(), add_generation_prompt=True)


def test_round_trip_with_tool_results_renders_qwen3_layout(processor):
    reply = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    calls = parse_tool_calls(reply)
    messages = _spoken_request() + [
        tool_calls_to_message(calls, content=strip_tool_calls(reply)),
        {"role": "tool", "name": "get_weather", "content": json.dumps(get_weather(**calls[0]["arguments"]))},
        {"role": "tool", "name": "get_weather", "content": {"note": "second result"}},
    ]
    text = processor.apply_chat_template(
        messages, tools=[WEATHER_SCHEMA], add_generation_prompt=True, speech_output=True
    )
    tail = text[text.index("<|im_start|>assistant\n") :]
    assert tail == (
        "<|im_start|>assistant\nLet me check.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n"
        '<tool_response>\n{"city": "Paris", "temp": 21, "unit": "celsius"}\n</tool_response>\n'
        '<tool_response>\n{"note": "second result"}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n"
    )
    out = processor.apply_chat_template(
        messages,
        tools=[WEATHER_SCHEMA],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    assert out["input_features"].shape[0] == 1  # only the spoken request is an audio input
    # the tool tags are single tokens of the vocabulary
    ids = out["input_ids"][0].tolist()
    assert ids.count(processor.tokenizer.convert_tokens_to_ids("<tool_response>")) == 2


def test_parallel_calls_render_one_block_each(processor):
    messages = [
        {"role": "user", "content": "weather in two cities"},
        {
            "role": "assistant",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
            ],
        },
    ]
    text = processor.apply_chat_template(messages)
    assert text.endswith(
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>\n'
    )
    assert [c["arguments"]["city"] for c in parse_tool_calls(text)] == ["Paris", "Rome"]


# --------------------------------------------------------------------------------------------- parsing
def test_parse_single_call():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert parse_tool_calls(text) == [{"name": "get_weather", "arguments": {"city": "Paris"}}]


def test_parse_parallel_nested_and_surrounding_text():
    text = (
        "Sure, I'll do both.\n"
        '<tool_call>\n{"name": "book", "arguments": {"guest": {"name": "Ann", "tags": ["vip", 1]}, "nights": 2}}\n</tool_call>\n'
        'some words in between <tool_call>{"name": "set_alarm", "arguments": "{\\"time\\": \\"07:30\\"}"}</tool_call>'
        " and after."
    )
    assert parse_tool_calls(text) == [
        {"name": "book", "arguments": {"guest": {"name": "Ann", "tags": ["vip", 1]}, "nights": 2}},
        {"name": "set_alarm", "arguments": {"time": "07:30"}},
    ]
    assert strip_tool_calls(text) == "Sure, I'll do both.\n\nsome words in between  and after."


def test_parse_malformed_is_reported_not_dropped():
    text = (
        '<tool_call>{"name": "ok", "arguments": {}}</tool_call>'
        '<tool_call>{"name": "broken", "arguments": {"city": "Paris"</tool_call>'
        '<tool_call>["not", "an", "object"]</tool_call>'
        '<tool_call>{"name": "cut", "arguments": {"x'
    )
    calls = parse_tool_calls(text)
    assert len(calls) == 4
    assert calls[0] == {"name": "ok", "arguments": {}}
    assert calls[1]["name"] == "broken" and calls[1]["arguments"] is None
    assert calls[1]["unparsed"] == '{"name": "broken", "arguments": {"city": "Paris"'
    assert "not valid JSON" in calls[1]["error"]
    assert calls[2]["name"] is None and 'string "name"' in calls[2]["error"]
    assert calls[3]["name"] == "cut" and "no closing </tool_call>" in calls[3]["error"]
    # one policy: what is not a call stays in the visible text, tags included; well-formed calls leave it
    assert strip_tool_calls(text) == text[len('<tool_call>{"name": "ok", "arguments": {}}</tool_call>') :]
    parser = StreamingToolCallParser()
    shown = []
    for piece in (text[i : i + 7] for i in range(0, len(text), 7)):
        parser.feed(piece)
        shown.append(parser.take_content())
    parser.finish()
    assert "".join(shown) + parser.take_content() == strip_tool_calls(text)
    with pytest.raises(ToolCallParseError, match="not valid JSON") as info:
        parse_tool_calls(text, strict=True)
    assert info.value.raw.startswith('{"name": "broken"')
    with pytest.raises(ToolCallParseError, match="no closing"):
        parse_tool_calls('<tool_call>{"name": "cut"', strict=True)


def test_parse_bad_arguments_string():
    calls = parse_tool_calls('<tool_call>{"name": "f", "arguments": "{oops"}</tool_call>')
    assert calls[0]["name"] == "f" and calls[0]["arguments"] is None and "not valid JSON" in calls[0]["error"]
    assert parse_tool_calls("no calls here") == []


def test_processor_method_parses_ids(processor):
    text = 'ok <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    ids = [processor.audio_bos_token_id] + processor.tokenizer(text)["input_ids"] + [processor.im_end_token_id]
    assert processor.parse_tool_calls(ids) == [{"name": "get_weather", "arguments": {"city": "Oslo"}}]
    assert processor.parse_tool_calls(text) == processor.parse_tool_calls(ids)


def test_streamed_text_parses_like_the_final_text(processor):
    from transformers import TextIteratorStreamer

    reply = (
        'Checking now. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", "days": [1, 2]}}\n</tool_call>'
        '<tool_call>\n{"name": "set_alarm", "arguments": {"time": "07:00"}}\n</tool_call>'
    )
    ids = processor.tokenizer(reply)["input_ids"] + [processor.im_end_token_id]
    streamer = TextIteratorStreamer(processor.tokenizer, skip_special_tokens=True)
    for token in ids:  # what generate() does: one token per step
        streamer.put(torch.tensor([token]))
    streamer.end()
    pieces = list(streamer)
    assert len(pieces) > 3
    parser = StreamingToolCallParser()
    completed = []
    for piece in pieces:
        completed.extend(parser.feed(piece))
    completed.extend(parser.finish())
    final = parse_tool_calls(processor.decode_text(ids))
    assert completed == final == parse_tool_calls("".join(pieces))
    assert [c["name"] for c in final] == ["get_weather", "set_alarm"]
    # the streaming parser reports each call as soon as its closing tag arrives, even split mid-tag
    parser = StreamingToolCallParser()
    seen_at = [i for i, ch in enumerate(reply) if parser.feed(ch)]
    assert seen_at == [reply.index("</tool_call>") + len("</tool_call>") - 1, len(reply) - 1]


def test_streaming_parser_reports_unclosed_call():
    parser = StreamingToolCallParser()
    assert parser.feed('<tool_call>{"name": "f", "argu') == []
    leftover = parser.finish()
    assert leftover[0]["name"] == "f" and "no closing" in leftover[0]["error"]


# --------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_tool_conversation_runs_end_to_end_on_tiny_model(processor):
    """Spoken request + tools -> generate -> parse; then tool result -> spoken answer, on the tiny random model."""
    from fun_audio_chat import FunAudioChatForConditionalGeneration
    from fun_audio_chat.tiny import tiny_config

    torch.manual_seed(0)
    model = FunAudioChatForConditionalGeneration(tiny_config()).eval()
    messages = _spoken_request()
    inputs = processor.apply_chat_template(
        messages, tools=[get_weather], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False, return_speech=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    calls = processor.parse_tool_calls(new)  # a random model writes no call; parsing must still work
    assert isinstance(calls, list)
    # pretend the model called the tool, feed the result back and ask for a spoken answer
    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    messages = messages + [
        tool_calls_to_message([call]),
        {"role": "tool", "name": "get_weather", "content": json.dumps(get_weather("Paris"))},
    ]
    inputs = processor.apply_chat_template(
        messages,
        tools=[get_weather],
        add_generation_prompt=True,
        speech_output=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=6, do_sample=False, force_audio_bos=True, return_dict_in_generate=True
        )
    assert out.sequences.shape[1] > inputs["input_ids"].shape[1]
    text = processor.decode_text(out.sequences[0, inputs["input_ids"].shape[1] :])
    assert isinstance(text, str)
    codes = processor.decode_speech(out.speech_ids, speech_attention_mask=out.speech_attention_mask)
    assert len(codes) == 1 and all(0 <= c < processor.num_speech_codes for c in codes[0])
