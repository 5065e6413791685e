"""The Fun-Audio-Chat chat template (Jinja), saved as ``chat_template.jinja`` by ``save_pretrained``.

Rendered layout (docs/official-format.md#prompt), for a system prompt, one spoken user turn with an instruction and a generation prompt::

    <|im_start|>system\n{SYSTEM}<|im_end|>\n
    <|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|>\n{instruction}<|im_end|>\n
    <|im_start|>assistant\n

Rules:

* The system prompt is the first message when it has role ``system``; otherwise the speech-to-text prompt, or the
  speech-and-text prompt when the template variable ``speech_output=True`` is passed
  (``processor.apply_chat_template(messages, speech_output=True)``).
* Content is a string or a list of items; ``{"type": "audio", ...}`` renders one ``AUDIO_TEMPLATE`` (the processor
  expands ``<|AUDIO|>`` to the clip's number of 5 Hz positions), ``{"type": "text", "text": ...}`` renders the text;
  items are joined with a newline.
* Earlier assistant turns render their text only (the official multi-turn format feeds replies back as text); audio
  items of assistant messages are skipped. ``tool_calls`` render as ``<tool_call>`` blocks after the text.
* With ``tools``, the system prompt gets a ``# Tools`` section (see :mod:`.prompts`). Messages with role ``tool``
  render as ``<tool_response>`` blocks inside one user turn per run of consecutive tool messages (Qwen3 layout).
"""

from __future__ import annotations

from .prompts import DEFAULT_S2M_PROMPT, DEFAULT_S2T_PROMPT, TOOLS_SECTION_FOOTER, TOOLS_SECTION_HEADER


def _jinja_literal(text: str) -> str:
    """A Python string as a single-quoted Jinja string literal."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return "'" + escaped + "'"


# First line of every template this library writes: how a loaded processor tells ours from a checkpoint's other one.
CHAT_TEMPLATE_MARKER = "{#- Fun-Audio-Chat chat template (fun_audio_chat) -#}"

_TEMPLATE = (
    CHAT_TEMPLATE_MARKER
    + r"""
{%- macro render_text(content, with_audio) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content is iterable -%}
        {%- set ns = namespace(parts=[]) -%}
        {%- for item in content -%}
            {%- if item.type == 'audio' -%}
                {%- if with_audio -%}
                    {%- set ns.parts = ns.parts + ['<|audio_bos|><|AUDIO|><|audio_eos|>'] -%}
                {%- endif -%}
            {%- elif item.type == 'text' -%}
                {%- set ns.parts = ns.parts + [item.text] -%}
            {%- endif -%}
        {%- endfor -%}
        {{- ns.parts | join('\n') -}}
    {%- endif -%}
{%- endmacro -%}
{%- if messages and messages[0].role == 'system' -%}
    {%- set system_prompt = render_text(messages[0].content, false) -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- if speech_output is defined and speech_output -%}
        {%- set system_prompt = @S2M@ -%}
    {%- else -%}
        {%- set system_prompt = @S2T@ -%}
    {%- endif -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{{- '<|im_start|>system\n' + system_prompt -}}
{%- if tools -%}
    {{- @TOOLS_HEADER@ -}}
    {%- for tool in tools -%}
        {{- '\n' -}}{{- tool | tojson -}}
    {%- endfor -%}
    {{- @TOOLS_FOOTER@ -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- for message in loop_messages -%}
    {%- if message.role == 'assistant' -%}
        {%- set text = render_text(message.content, false) if message.content is defined else '' -%}
        {{- '<|im_start|>assistant\n' -}}
        {%- generation -%}
        {{- text -}}
        {%- if message.tool_calls is defined and message.tool_calls -%}
            {%- for tool_call in message.tool_calls -%}
                {%- if text or not loop.first -%}{{- '\n' -}}{%- endif -%}
                {%- set call = tool_call.function if tool_call.function is defined else tool_call -%}
                {{- '<tool_call>\n{"name": ' + (call.name | tojson) + ', "arguments": ' -}}
                {%- if call.arguments is string -%}
                    {{- call.arguments -}}
                {%- else -%}
                    {{- call.arguments | tojson -}}
                {%- endif -%}
                {{- '}\n</tool_call>' -}}
            {%- endfor -%}
        {%- endif -%}
        {{- '<|im_end|>\n' -}}
        {%- endgeneration -%}
    {%- elif message.role == 'tool' -%}
        {%- if loop.first or loop_messages[loop.index0 - 1].role != 'tool' -%}
            {{- '<|im_start|>user' -}}
        {%- endif -%}
        {{- '\n<tool_response>\n' -}}
        {%- if message.content is string -%}
            {{- message.content -}}
        {%- elif message.content is mapping -%}
            {{- message.content | tojson -}}
        {%- else -%}
            {{- render_text(message.content, false) -}}
        {%- endif -%}
        {{- '\n</tool_response>' -}}
        {%- if loop.last or loop_messages[loop.index0 + 1].role != 'tool' -%}
            {{- '<|im_end|>\n' -}}
        {%- endif -%}
    {%- else -%}
        {{- '<|im_start|>' + message.role + '\n' + render_text(message.content, true) + '<|im_end|>\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""
)

CHAT_TEMPLATE = (
    _TEMPLATE.replace("@S2T@", _jinja_literal(DEFAULT_S2T_PROMPT))
    .replace("@S2M@", _jinja_literal(DEFAULT_S2M_PROMPT))
    .replace("@TOOLS_HEADER@", _jinja_literal(TOOLS_SECTION_HEADER))
    .replace("@TOOLS_FOOTER@", _jinja_literal(TOOLS_SECTION_FOOTER))
)


def is_fun_audio_chat_template(template) -> bool:
    """True for a chat template written by this library (any version), which renders typed audio items, tools,
    tool results and ``speech_output=`` in the Fun-Audio-Chat prompt layout. A dict of named templates counts when
    its ``default`` entry does."""
    if isinstance(template, dict):
        template = template.get("default")
    return isinstance(template, str) and template.lstrip().startswith(CHAT_TEMPLATE_MARKER)


__all__ = ["CHAT_TEMPLATE", "CHAT_TEMPLATE_MARKER", "is_fun_audio_chat_template"]
