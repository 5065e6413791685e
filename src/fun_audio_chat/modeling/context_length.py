"""How long a prompt and a reply may be: the one context-length rule of Fun-Audio-Chat.

Two position budgets bound a reply:

* the LLM: the final sequence, ``prompt_length + max_new_tokens`` ids, must fit ``text_config.max_position_embeddings``
  (transformers' rule for ``max_length``: a sequence that fits can be fed back as the next turn's prompt);
* the Speech Refined Head, for spoken replies: ``generate`` allocates its KV cache once per reply, for
  ``k * (new_positions + max(max_new_tokens, 1) + 1)`` sub-positions (``SpeechDecoder.start``; ``k`` is the
  group size and ``new_positions`` the prompt positions this call feeds, i.e. the whole prompt unless a cache of
  ``cached_length`` earlier positions is continued), and that allocation must fit the head's
  ``max_position_embeddings``.

:meth:`FunAudioChatForConditionalGeneration.context_fit` evaluates the rule; ``generate`` and the server refuse a
request with :meth:`ContextFit.check`, so the three never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ContextFit:
    """Whether ``prompt_length`` ids plus ``max_new_tokens`` steps fit the model, and the room left for a prompt.

    Attributes:
        llm_positions / llm_limit: ``prompt_length + max_new_tokens`` and the LLM's ``max_position_embeddings``.
        speech_head_positions / speech_head_limit: the Speech Refined Head cache a spoken reply allocates and the
            head's ``max_position_embeddings`` (both None for a text reply).
        max_prompt_length: the longest prompt that fits with these ``max_new_tokens`` (0 when none does).
    """

    prompt_length: int
    max_new_tokens: int
    cached_length: int
    group_size: int
    llm_positions: int
    llm_limit: int
    speech_head_positions: int | None
    speech_head_limit: int | None
    max_prompt_length: int

    @property
    def fits(self) -> bool:
        if self.llm_positions > self.llm_limit:
            return False
        return self.speech_head_positions is None or self.speech_head_positions <= self.speech_head_limit

    def check(self, length_name: str = "max_new_tokens") -> None:
        """Raise ``ValueError`` naming the limit and the fix when the request does not fit; ``length_name`` is what
        the caller calls ``max_new_tokens`` (the server says ``max_tokens``)."""
        if self.fits:
            return
        request = f"the prompt ({self.prompt_length} tokens) plus {length_name} ({self.max_new_tokens})"
        if self.llm_positions > self.llm_limit:
            raise ValueError(
                f"{request} = {self.llm_positions} exceeds the model's context: the LLM's max_position_embeddings is "
                f"{self.llm_limit}; shorten the audio/conversation or lower {length_name} (a prompt of at most "
                f"{self.max_prompt_length} tokens fits)."
            )
        new_positions = self.prompt_length - self.cached_length
        raise ValueError(
            f"{request} exceeds the model's context: the Speech Refined Head would need {self.speech_head_positions} "
            f"positions (group size {self.group_size} x ({new_positions} prompt + {max(self.max_new_tokens, 1)} "
            f"reply + 1)) but supports {self.speech_head_limit}; shorten the audio/conversation, lower "
            f"{length_name}, or reply with text only (a prompt of at most {self.max_prompt_length} tokens fits)."
        )


def context_fit(
    *,
    prompt_length: int,
    max_new_tokens: int,
    llm_limit: int,
    group_size: int,
    speech_head_limit: int | None,
    cached_length: int = 0,
) -> ContextFit:
    """The rule of the module docstring; ``speech_head_limit=None`` for a text reply."""
    if prompt_length < 0 or max_new_tokens < 0 or not 0 <= cached_length <= max(prompt_length, 0):
        raise ValueError(
            f"need 0 <= cached_length <= prompt_length and max_new_tokens >= 0; got prompt_length={prompt_length}, "
            f"max_new_tokens={max_new_tokens}, cached_length={cached_length}."
        )
    room = llm_limit - max_new_tokens
    head_positions = None
    if speech_head_limit is not None:
        reply_positions = max(max_new_tokens, 1) + 1
        head_positions = group_size * (prompt_length - cached_length + reply_positions)
        room = min(room, speech_head_limit // group_size - reply_positions + cached_length)
    return ContextFit(
        prompt_length=prompt_length,
        max_new_tokens=max_new_tokens,
        cached_length=cached_length,
        group_size=group_size,
        llm_positions=prompt_length + max_new_tokens,
        llm_limit=llm_limit,
        speech_head_positions=head_positions,
        speech_head_limit=speech_head_limit,
        max_prompt_length=max(room, 0),
    )


__all__ = ["ContextFit", "context_fit"]
