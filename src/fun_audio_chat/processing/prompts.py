"""System prompts and fixed strings of the Fun-Audio-Chat prompt format (docs/official-format.md#prompt).

The model picks its output modality from the system prompt it was trained with:

* :data:`DEFAULT_S2T_PROMPT` — answer with text only (speech-to-text).
* :data:`DEFAULT_S2M_PROMPT` — answer with text and speech at the same time (speech-to-multimodal).
* :data:`SPOKEN_S2M_PROMPT` — the speech-out prompt with the persona used by the official spoken demo.

The chat template (:mod:`fun_audio_chat.processing.chat_template`) renders these strings; tests check that the
template and these constants agree.
"""

from __future__ import annotations

DEFAULT_S2T_PROMPT = "You are asked to generate text tokens."
DEFAULT_S2M_PROMPT = "You are asked to generate both text and speech tokens at the same time."

# The official spoken demo appends a short Chinese persona to the speech-out prompt. Translated: "Your name is
# Xiaoyun, a voice assistant. You chat with users in a natural, friendly spoken style, keep answers short, and
# can also speak Sichuanese and Cantonese." (our wording; same persona name and dialects as docs/official-format.md#prompt).
SPOKEN_PERSONA = (
    "你的名字是小云，是一个语音助手。请用自然、亲切的口语和用户聊天，回答尽量简短。你会说普通话，也会说四川话和粤语。"
)
SPOKEN_S2M_PROMPT = DEFAULT_S2M_PROMPT + " " + SPOKEN_PERSONA

# One user audio in the prompt before placeholder expansion.
AUDIO_TEMPLATE = "<|audio_bos|><|AUDIO|><|audio_eos|>"

# Number of 25 Hz speech-BOS codes in front of every assistant speech reply in the training data (2 full groups).
SPEECH_DELAY_TOKENS = 10

# Tool-use section appended to the system prompt when ``tools`` are given (docs/official-format.md#prompt layout: a "# Tools" header,
# one JSON signature per line inside <tools></tools>, and calls requested as <tool_call>{...}</tool_call> blocks).
# The wording is ours; the chat template renders exactly this text (see ``render_tools_section``).
TOOLS_SECTION_HEADER = (
    "\n\n# Tools\n\n"
    "You can call functions to help with the user's request. "
    "The functions you can use are described by the JSON signatures inside <tools></tools>:\n"
    "<tools>"
)
TOOLS_SECTION_FOOTER = (
    "\n</tools>\n\n"
    "To call a function, reply with one JSON object per call, each inside its own <tool_call></tool_call> tags:\n"
    '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


def render_tools_section(tool_schemas: list[dict]) -> str:
    """The tool section of the system prompt, as the chat template renders it (one compact JSON per tool)."""
    import json

    lines = "".join("\n" + json.dumps(schema, ensure_ascii=False) for schema in tool_schemas)
    return TOOLS_SECTION_HEADER + lines + TOOLS_SECTION_FOOTER


__all__ = [
    "AUDIO_TEMPLATE",
    "DEFAULT_S2M_PROMPT",
    "DEFAULT_S2T_PROMPT",
    "SPEECH_DELAY_TOKENS",
    "SPOKEN_PERSONA",
    "SPOKEN_S2M_PROMPT",
    "TOOLS_SECTION_FOOTER",
    "TOOLS_SECTION_HEADER",
    "render_tools_section",
]
