"""Conversations the template would render wrongly are refused with an error naming the problem."""

from __future__ import annotations

import pytest

from .conftest import noise

AUDIO = {"type": "audio", "audio": noise(16000), "sampling_rate": 16000}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


@pytest.mark.parametrize(
    ("conversation", "message"),
    [
        ([], "is empty"),
        ([[{"role": "user", "content": "hi"}], []], "conversation 1 is empty"),
        ([{"role": "bot", "content": "hi"}], "role 'bot'"),
        ([{"role": "user", "content": 42}], "content of type int"),
        ([{"role": "user", "content": {"text": "hi"}}], "content of type dict"),
        ([{"role": "user", "content": [{"type": "image", "url": "x.png"}]}], "type 'image'"),
        ([{"role": "user", "content": [{"type": "text"}]}], "text item without a string 'text'"),
        ([{"role": "user", "content": ["hello"]}], "must be a dict"),
        ([{"role": "user", "content": [AUDIO]}, {"role": "tool", "content": "21 C"}], "without a preceding assistant"),
        (
            [{"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": {}}}]}],
            "needs a function name",
        ),
        (["hello"], "must be a dict with 'role'"),
    ],
)
def test_bad_conversations_are_refused(processor, conversation, message):
    with pytest.raises(ValueError, match=message):
        processor.apply_chat_template(conversation, add_generation_prompt=True)


@pytest.mark.parametrize(
    ("tools", "message"),
    [
        ([{"type": "function", "function": {"description": "no name"}}], "tool 0 is not a function schema"),
        (["get_weather"], "tool 0 is not a function schema"),
        ([{"name": "f", "parameters": "city"}], "'parameters' must be a JSON-schema object"),
        ({"name": "f"}, "tools must be a list"),
    ],
)
def test_malformed_tool_schemas_are_refused(processor, tools, message):
    with pytest.raises(ValueError, match=message):
        processor.apply_chat_template([{"role": "user", "content": "hi"}], tools=tools, add_generation_prompt=True)


def test_misspelled_or_mistyped_flag_is_refused(processor):
    with pytest.raises(ValueError, match="did you mean 'speech_output'"):
        processor.apply_chat_template([{"role": "user", "content": "hi"}], speech_ouput=True)
    with pytest.raises(ValueError, match="speech_output must be True or False"):
        processor.apply_chat_template([{"role": "user", "content": "hi"}], speech_output="yes")


def test_valid_tool_round_and_tool_after_tool_are_accepted(processor):
    messages = [
        {"role": "user", "content": [AUDIO]},
        {"role": "assistant", "content": None, "tool_calls": [CALL, CALL]},
        {"role": "tool", "content": {"temperature": 21}},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is 21 degrees and sunny."},
        {"role": "user", "content": "thanks"},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text.count("<tool_response>") == 2 and text.endswith("<|im_start|>assistant\n")


def test_an_explicit_foreign_template_is_not_policed(processor):
    template = "{% for m in messages %}[{{ m.role }}]{% endfor %}"
    assert processor.apply_chat_template([{"role": "narrator", "content": 3}], chat_template=template) == "[narrator]"
