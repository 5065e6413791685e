"""Tool calls in generated text: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks.

The chat template asks the model for one JSON object per call inside ``<tool_call></tool_call>`` tags (see
:mod:`.prompts`). :func:`parse_tool_calls` returns every block in order:

* a well-formed block → ``{"name": str, "arguments": dict}`` (``arguments`` given as a JSON string is decoded);
* a block that is not valid JSON or lacks a name → ``{"name": <name if found or None>, "arguments": None,
  "unparsed": <raw block text>, "error": <why>}`` — never silently dropped; with ``strict=True`` a
  :class:`ToolCallParseError` is raised instead;
* an opening tag without a closing tag at the end of the text (cut-off generation) is reported the same way.

:class:`StreamingToolCallParser` does the same on text that arrives in pieces (a streamer), yielding each call as
soon as its closing tag arrives; feeding the pieces of a text gives the same calls as parsing the whole text.

A spoken request → tool call → tool result → spoken answer loop::

    inputs = processor.apply_chat_template(messages, tools=[get_weather], add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")
    sequences = model.generate(**inputs, return_speech=False, max_new_tokens=256)
    reply = processor.decode_text(sequences[0, inputs["input_ids"].shape[1]:])
    calls = parse_tool_calls(reply)                     # [{"name": "get_weather", "arguments": {...}}]
    messages.append(tool_calls_to_message(calls, content=strip_tool_calls(reply)))
    for call in calls:
        messages.append({"role": "tool", "name": call["name"], "content": json.dumps(get_weather(**call["arguments"]))})
    inputs = processor.apply_chat_template(messages, tools=[get_weather], add_generation_prompt=True,
                                           speech_output=True, tokenize=True, return_dict=True, return_tensors="pt")
    out = model.generate(**inputs, return_dict_in_generate=True)   # text + speech codes of the spoken answer
"""

from __future__ import annotations

import json
import re
from typing import Any

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"

_BLOCK_RE = re.compile(re.escape(TOOL_CALL_START) + r"(.*?)" + re.escape(TOOL_CALL_END), re.DOTALL)
_NAME_RE = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')


class ToolCallParseError(ValueError):
    """A ``<tool_call>`` block that is not a valid ``{"name": ..., "arguments": ...}`` JSON object."""

    def __init__(self, message: str, raw: str):
        super().__init__(message)
        self.raw = raw


def _unparsed(raw: str, error: str) -> dict[str, Any]:
    match = _NAME_RE.search(raw)
    name = None
    if match:
        try:
            name = json.loads('"' + match.group(1) + '"')
        except json.JSONDecodeError:
            name = match.group(1)
    return {"name": name, "arguments": None, "unparsed": raw, "error": error}


def parse_tool_call_block(raw: str, strict: bool = False) -> dict[str, Any]:
    """Parse the text between one pair of ``<tool_call>`` tags."""
    body = raw.strip()
    try:
        data = json.loads(body)
    except json.JSONDecodeError as err:
        message = f"tool call is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}): {body[:200]!r}"
        if strict:
            raise ToolCallParseError(message, raw) from err
        return _unparsed(raw, message)
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
        message = f'tool call must be a JSON object with a string "name": {body[:200]!r}'
        if strict:
            raise ToolCallParseError(message, raw)
        return _unparsed(raw, message)
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as err:
            message = f"tool call arguments of {data['name']!r} are a string that is not valid JSON: {arguments[:200]!r}"
            if strict:
                raise ToolCallParseError(message, raw) from err
            return _unparsed(raw, message) | {"name": data["name"]}
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        message = f"tool call arguments of {data['name']!r} must be a JSON object, got {type(arguments).__name__}"
        if strict:
            raise ToolCallParseError(message, raw)
        return _unparsed(raw, message) | {"name": data["name"]}
    return {"name": data["name"], "arguments": arguments}


def parse_tool_calls(text: str, strict: bool = False) -> list[dict[str, Any]]:
    """All tool calls in ``text`` in order (see the module docstring for the entry format)."""
    calls = [parse_tool_call_block(match.group(1), strict=strict) for match in _BLOCK_RE.finditer(text)]
    tail_start = text.rfind(TOOL_CALL_START)
    if tail_start != -1 and text.find(TOOL_CALL_END, tail_start) == -1:
        raw = text[tail_start + len(TOOL_CALL_START) :]
        message = "tool call has no closing </tool_call> tag (generation cut off?)"
        if strict:
            raise ToolCallParseError(message, raw)
        calls.append(_unparsed(raw, message))
    return calls


def strip_tool_calls(text: str) -> str:
    """The text of a reply without its ``<tool_call>`` blocks (what to show or speak to the user)."""
    text = _BLOCK_RE.sub("", text)
    cut = text.find(TOOL_CALL_START)
    if cut != -1:
        text = text[:cut]
    return text.strip()


def tool_calls_to_message(calls: list[dict[str, Any]], content: str = "") -> dict[str, Any]:
    """An assistant message (OpenAI/transformers layout) carrying parsed calls, to append to the conversation."""
    tool_calls = [
        {"type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}
        for call in calls
        if call.get("arguments") is not None
    ]
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


class StreamingToolCallParser:
    """Incremental tool-call parser for streamed text.

    >>> parser = StreamingToolCallParser()
    >>> for piece in pieces:
    ...     for call in parser.feed(piece):
    ...         run(call)
    >>> leftover_calls = parser.finish()
    """

    def __init__(self, strict: bool = False):
        self.strict = strict
        self._buffer = ""
        self._calls: list[dict[str, Any]] = []
        self.text = ""  # everything fed so far

    @property
    def calls(self) -> list[dict[str, Any]]:
        return list(self._calls)

    def feed(self, piece: str) -> list[dict[str, Any]]:
        """Add streamed text; returns the calls completed by it."""
        self.text += piece
        self._buffer += piece
        done = []
        while True:
            start = self._buffer.find(TOOL_CALL_START)
            if start == -1:
                # keep a possible partial opening tag at the end
                keep = max(0, len(self._buffer) - len(TOOL_CALL_START) + 1)
                self._buffer = self._buffer[keep:]
                break
            end = self._buffer.find(TOOL_CALL_END, start)
            if end == -1:
                self._buffer = self._buffer[start:]
                break
            raw = self._buffer[start + len(TOOL_CALL_START) : end]
            call = parse_tool_call_block(raw, strict=self.strict)
            done.append(call)
            self._buffer = self._buffer[end + len(TOOL_CALL_END) :]
        self._calls.extend(done)
        return done

    def finish(self) -> list[dict[str, Any]]:
        """End of stream: reports an unclosed block, if any. Returns the calls completed by this call."""
        done = []
        start = self._buffer.find(TOOL_CALL_START)
        if start != -1:
            raw = self._buffer[start + len(TOOL_CALL_START) :]
            message = "tool call has no closing </tool_call> tag (generation cut off?)"
            if self.strict:
                raise ToolCallParseError(message, raw)
            done.append(_unparsed(raw, message))
        self._buffer = ""
        self._calls.extend(done)
        return done


__all__ = [
    "TOOL_CALL_END",
    "TOOL_CALL_START",
    "StreamingToolCallParser",
    "ToolCallParseError",
    "parse_tool_call_block",
    "parse_tool_calls",
    "strip_tool_calls",
    "tool_calls_to_message",
]
