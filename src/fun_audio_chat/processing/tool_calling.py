"""Tool calls in generated text: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks.

The chat template asks the model for one JSON object per call inside ``<tool_call></tool_call>`` tags (see
:mod:`.prompts`). :func:`parse_tool_calls` returns every block in order:

* a well-formed block → ``{"name": str, "arguments": dict}`` (``arguments`` given as a JSON string is decoded);
* a block that is not valid JSON or lacks a name → ``{"name": <name if found or None>, "arguments": None,
  "unparsed": <raw block text>, "error": <why>}`` — never silently dropped; with ``strict=True`` a
  :class:`ToolCallParseError` is raised instead;
* an opening tag without a closing tag at the end of the text (cut-off generation) is reported the same way.

:class:`StreamingToolCallParser` does the same on text that arrives in pieces (a streamer), yielding each call as
soon as its closing tag arrives; feeding the pieces of a text gives the same calls as parsing the whole text. It
also gives the reply's visible content as it settles (:meth:`~StreamingToolCallParser.take_content`).

One policy for a block that is not a well-formed call (bad JSON, no name, cut off): it is reported among the calls
with ``arguments=None`` *and* stays in the visible content (:func:`strip_tool_calls`, ``take_content``), tags
included, so nothing the model said disappears. The OpenAI-compatible and Realtime servers use this parser, so
they show such a block as text (an OpenAI tool call must name a function and carry JSON arguments).

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


def _loads(text: str) -> Any:
    """``json.loads`` that fails only with ``ValueError``: a nesting too deep for the decoder (``RecursionError``)
    and an integer longer than Python's digit limit are bad model output like any other invalid JSON."""
    try:
        return json.loads(text)
    except RecursionError as err:
        raise ValueError("nested too deeply to decode") from err


def _json_error(err: ValueError) -> str:
    if isinstance(err, json.JSONDecodeError):
        return f"{err.msg} at line {err.lineno} column {err.colno}"
    return str(err).split(";")[0]


def parse_tool_call_block(raw: str, strict: bool = False) -> dict[str, Any]:
    """Parse the text between one pair of ``<tool_call>`` tags."""
    body = raw.strip()
    try:
        data = _loads(body)
    except ValueError as err:
        message = f"tool call is not valid JSON ({_json_error(err)}): {body[:200]!r}"
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
            arguments = _loads(arguments) if arguments.strip() else {}
        except ValueError as err:
            message = (
                f"tool call arguments of {data['name']!r} are a string that is not valid JSON: {arguments[:200]!r}"
            )
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
    """All tool calls in ``text`` in order (see the module docstring for the entry format).

    Runs in time linear in ``len(text)``. A block runs from an opening tag to the next closing tag (an opening tag
    inside it is part of its text); an opening tag never closed makes the last entry, reported as cut off.
    """
    parser = StreamingToolCallParser(strict=strict)
    return parser.feed(text) + parser.finish()


def strip_tool_calls(text: str) -> str:
    """The text of a reply without its well-formed ``<tool_call>`` blocks (what to show or speak to the user); a
    block that is not a call stays, as the module docstring's policy says."""
    parser = StreamingToolCallParser()
    parser.feed(text)
    parser.finish()
    return parser.take_content().strip()


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that begins ``tag`` (a tag may arrive split across pieces)."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


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

    Each piece is scanned once (plus a carry shorter than a tag), so the total work is linear in the text fed,
    whatever the piece sizes. :meth:`take_content` returns the visible text settled since its last call: text
    outside well-formed calls, holding back only what may be the start of a tag.
    """

    def __init__(self, strict: bool = False):
        self.strict = strict
        self._calls: list[dict[str, Any]] = []
        self._pieces: list[str] = []  # everything fed so far, joined on demand by ``text``
        self._carry = ""  # tail that may hold the start of a tag split across pieces
        self._in_block = False
        self._block: list[str] = []  # text of the open block, without the carry
        self._content: list[str] = []  # settled visible text not taken yet

    @property
    def text(self) -> str:
        """Everything fed so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    @property
    def calls(self) -> list[dict[str, Any]]:
        return list(self._calls)

    def take_content(self) -> str:
        """The visible text settled since the last call (all of it once :meth:`finish` ran)."""
        content = "".join(self._content)
        self._content = []
        return content

    def feed(self, piece: str) -> list[dict[str, Any]]:
        """Add streamed text; returns the calls completed by it."""
        if not isinstance(piece, str):
            raise TypeError(f"StreamingToolCallParser.feed takes text, got {type(piece).__name__}")
        self._pieces.append(piece)
        data = self._carry + piece
        self._carry = ""
        done = []
        while data:
            if not self._in_block:
                start = data.find(TOOL_CALL_START)
                if start == -1:
                    keep = _partial_tag(data, TOOL_CALL_START)
                    self._content.append(data[: len(data) - keep])
                    self._carry = data[len(data) - keep :]
                    break
                self._content.append(data[:start])
                self._in_block = True
                self._block = []
                data = data[start + len(TOOL_CALL_START) :]
            else:
                end = data.find(TOOL_CALL_END)
                if end == -1:
                    keep = len(TOOL_CALL_END) - 1
                    if len(data) > keep:
                        self._block.append(data[:-keep])
                        data = data[-keep:]
                    self._carry = data
                    break
                self._block.append(data[:end])
                data = data[end + len(TOOL_CALL_END) :]
                self._in_block = False
                raw = "".join(self._block)
                call = parse_tool_call_block(raw, strict=self.strict)
                if call.get("arguments") is None:  # not a call: it stays visible
                    self._content.append(TOOL_CALL_START + raw + TOOL_CALL_END)
                done.append(call)
                self._block = []
        self._calls.extend(done)
        return done

    def finish(self) -> list[dict[str, Any]]:
        """End of stream: reports an unclosed block, if any. Returns the calls completed by this call."""
        done = []
        if self._in_block:
            raw = "".join(self._block) + self._carry
            self._in_block = False
            self._block = []
            message = "tool call has no closing </tool_call> tag (generation cut off?)"
            if self.strict:
                self._carry = ""
                raise ToolCallParseError(message, raw)
            done.append(_unparsed(raw, message))
            self._content.append(TOOL_CALL_START + raw)
        else:
            self._content.append(self._carry)
        self._carry = ""
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
