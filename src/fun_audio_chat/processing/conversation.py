"""Checks on a conversation before the Fun-Audio-Chat chat template renders it.

Jinja renders what it does not understand as nothing: an unknown role, a content of the wrong type, an image item
or a text item without text would silently become an empty or missing turn, and a misspelled template flag
(``speech_ouput=True``) would silently be ignored. These checks turn each of those into an error that names the
message, the problem and the fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
CONTENT_ITEM_TYPES = ("text", "audio")
# Variables the built-in template reads besides the standard ones transformers passes.
TEMPLATE_FLAGS = ("speech_output",)


def split_batch(conversation: Any) -> list:
    """A single conversation or a batch of them, as a list of conversations (an empty input is one empty one)."""
    if isinstance(conversation, (list, tuple)) and conversation and isinstance(conversation[0], (list, tuple)):
        return list(conversation)
    if isinstance(conversation, Mapping) and "messages" in conversation:
        return [conversation["messages"]]
    return [conversation]


def validate_conversation(messages: Any, index: int | None = None) -> None:
    """Raise ``ValueError`` for a conversation the chat template would render wrongly."""
    where = "the conversation" if index is None else f"conversation {index}"
    if not isinstance(messages, (list, tuple)):
        raise ValueError(
            f"{where} must be a list of messages (dicts with 'role' and 'content'), got {type(messages).__name__}."
        )
    if not messages:
        raise ValueError(f"{where} is empty; give at least one message, e.g. {{'role': 'user', 'content': ...}}.")
    pending_tool_calls = False
    for position, message in enumerate(messages):
        name = f"message {position} of {where}"
        if not isinstance(message, Mapping):
            raise ValueError(f"{name} must be a dict with 'role' and 'content', got {type(message).__name__}.")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(
                f"{name} has role {role!r}; Fun-Audio-Chat conversations use the roles {', '.join(ROLES)}."
            )
        content = message.get("content")
        if role == "tool":
            if not pending_tool_calls:
                raise ValueError(
                    f"{name} is a tool result without a preceding assistant message with tool_calls; put the "
                    "assistant's call (tool_calls=[...]) before its result."
                )
            if not isinstance(content, (str, Mapping, list, tuple)):
                raise ValueError(f"{name} (tool result) needs a string, a dict or a list of items as content.")
        elif content is None:
            if not (role == "assistant" and message.get("tool_calls")):
                raise ValueError(f"{name} has no content; give a string or a list of text/audio items.")
        elif not isinstance(content, (str, list, tuple)):
            raise ValueError(
                f"{name} has content of type {type(content).__name__}; give a string or a list of items such as "
                "{'type': 'text', 'text': ...} and {'type': 'audio', 'path': ...}."
            )
        if isinstance(content, (list, tuple)):
            for item_index, item in enumerate(content):
                _validate_item(item, f"item {item_index} of {name}")
        if role == "assistant":
            calls = message.get("tool_calls")
            if calls:
                _validate_tool_calls(calls, name)
            pending_tool_calls = bool(calls)
        elif role != "tool":
            pending_tool_calls = False


def _validate_item(item: Any, name: str) -> None:
    if not isinstance(item, Mapping):
        raise ValueError(f"{name} must be a dict with a 'type', got {type(item).__name__}.")
    kind = item.get("type")
    if kind not in CONTENT_ITEM_TYPES:
        raise ValueError(f"{name} has type {kind!r}; Fun-Audio-Chat takes 'text' and 'audio' items only.")
    if kind == "text" and not isinstance(item.get("text"), str):
        raise ValueError(f"{name} is a text item without a string 'text'; write {{'type': 'text', 'text': '...'}}.")


def _validate_tool_calls(calls: Any, name: str) -> None:
    if not isinstance(calls, (list, tuple)):
        raise ValueError(f"tool_calls of {name} must be a list of calls.")
    for call_index, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ValueError(
                f"tool call {call_index} of {name} needs a function name: "
                "{'type': 'function', 'function': {'name': ..., 'arguments': {...}}}."
            )
        if not isinstance(function.get("arguments", {}), (Mapping, str)):
            raise ValueError(
                f"tool call {call_index} of {name} has arguments that are neither a dict nor a JSON string."
            )


def validate_tools(tools: Sequence | None) -> None:
    """Tool schemas as the template renders them: JSON-schema dicts (``{"type": "function", "function": {...}}`` or
    the bare function dict) or Python functions (transformers turns those into schemas)."""
    if tools is None:
        return
    if not isinstance(tools, (list, tuple)):
        raise ValueError("tools must be a list of JSON schemas or Python functions.")
    for index, tool in enumerate(tools):
        if callable(tool):
            continue
        function = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError(
                f"tool {index} is not a function schema: give {{'type': 'function', 'function': {{'name': ..., "
                "'description': ..., 'parameters': {...}}}} or a Python function with a docstring."
            )
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, Mapping):
            raise ValueError(f"tool {index} ({function['name']}): 'parameters' must be a JSON-schema object (a dict).")


def check_template_flags(kwargs: Mapping[str, Any]) -> None:
    """Refuse a keyword that looks like a misspelled template flag (it would silently do nothing) and a flag of the
    wrong type."""
    for key in kwargs:
        if key in TEMPLATE_FLAGS:
            continue
        close = difflib.get_close_matches(key, TEMPLATE_FLAGS, n=1, cutoff=0.8)
        if close:
            raise ValueError(f"unknown argument {key!r}; did you mean {close[0]!r}?")
    flag = kwargs.get("speech_output")
    if flag is not None and not isinstance(flag, bool):
        raise ValueError(f"speech_output must be True or False, got {flag!r}.")


__all__ = ["ROLES", "check_template_flags", "split_batch", "validate_conversation", "validate_tools"]
