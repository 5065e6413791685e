"""Generated speech ids → the real speech codes a detokenizer voices: the one rule every consumer applies.

The Speech Refined Head writes more than sound into its groups of k ids: a spoken reply opens with speech-BOS
delay ids (10 of them in the official training layout), the last group is padded with the speech-pad id, the
speech-EOS id ends the reply's speech, and the codebook holds a few more ids that are not sounds at all. Only the
ids below the first special id are codes of the speech tokenizer (6561 S3Tokenizer codes in the release, 296 in
the tiny layout), and only those may reach a detokenizer. :func:`real_speech_codes` is that rule for one group;
:class:`SpeechCodeFilter` applies it to the groups of one reply as they stream in (it remembers that speech-EOS
was seen, so a later group yields nothing). ``processor.decode_speech``, ``SpeechAudioStreamer``, the server, the
CLI and :class:`~fun_audio_chat.voice_chat.VoiceChat` all use it.

The ids come from the model's config or the processor (:meth:`SpeechCodeLayout.of`), never from constants. This
module imports nothing from the package, so processing, modeling, token2wav and serving can all depend on it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

#: Speech codes per second of speech (the S3 tokenizer's 25 Hz; the LLM sees them grouped by 5, at 5 Hz).
SPEECH_FRAME_RATE = 25


@dataclass(frozen=True)
class SpeechCodeLayout:
    """Where the real codes end and the speech special ids sit in a speech codebook.

    Attributes:
        num_codes: real codes are ``0 <= code < num_codes``.
        eos_token_id: speech-EOS: nothing at or after it is speech.
        bos_token_id / pad_token_id: speech-BOS (delay) and speech-pad ids, dropped like every non-code id.
    """

    num_codes: int
    eos_token_id: int | None
    bos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if not isinstance(self.num_codes, int) or self.num_codes < 1:
            raise ValueError(f"num_codes must be a positive integer, got {self.num_codes!r}.")
        for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and 0 <= value < self.num_codes:
                raise ValueError(
                    f"{name}={value} lies inside the real codes [0, {self.num_codes}); a special id must not be a code."
                )

    @classmethod
    def from_config(cls, config: Any) -> SpeechCodeLayout:
        """From a ``FunAudioChatConfig`` (or its ``audio_config``): the special ids follow the real codes, so the
        codes are the ids below the smallest special id (6561 of 6565 in the release)."""
        audio = getattr(config, "audio_config", config)
        specials = {name: getattr(audio, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
        known = [value for value in specials.values() if value is not None]
        if not known:
            raise ValueError("the audio config names no speech bos/eos/pad id; cannot tell codes from special ids.")
        return cls(num_codes=min(known), **specials)

    @classmethod
    def from_processor(cls, processor: Any) -> SpeechCodeLayout:
        """From a ``FunAudioChatProcessor``: the code tokens of its speech tokenizer and its special ids."""
        return cls(
            num_codes=int(processor.num_speech_codes),
            eos_token_id=processor.speech_eos_token_id,
            bos_token_id=processor.speech_bos_token_id,
            pad_token_id=processor.speech_pad_token_id,
        )

    @classmethod
    def of(cls, source: Any) -> SpeechCodeLayout:
        """A layout from a layout, a processor, a model (its ``config``) or a config."""
        if isinstance(source, SpeechCodeLayout):
            return source
        if hasattr(source, "num_speech_codes") and hasattr(source, "speech_eos_token_id"):
            return cls.from_processor(source)
        config = getattr(source, "config", source)
        if hasattr(getattr(config, "audio_config", None), "eos_token_id") or hasattr(config, "codebook_size"):
            return cls.from_config(config)
        raise TypeError(
            f"cannot read a speech code layout from {type(source).__name__}; pass the FunAudioChatProcessor, the "
            "model, its config or a SpeechCodeLayout."
        )


def real_speech_codes(group: Iterable[int], layout: SpeechCodeLayout) -> tuple[list[int], bool]:
    """The real codes of one generated group of speech ids, and whether the group holds speech-EOS.

    Codes after speech-EOS are not speech; speech-BOS, pad and every other id outside ``[0, num_codes)`` are
    dropped. Works on any sequence of ids (a k-id group, or a whole row for offline decoding).
    """
    codes: list[int] = []
    for value in group:
        code = int(value)
        if code == layout.eos_token_id:
            return codes, True
        if 0 <= code < layout.num_codes:
            codes.append(code)
    return codes, False


class SpeechCodeFilter:
    """:func:`real_speech_codes` over the groups of one reply, in order: once speech-EOS is seen, :attr:`ended`
    is True and later groups yield no codes."""

    def __init__(self, layout: SpeechCodeLayout):
        self.layout = layout
        self.ended = False

    def __call__(self, group: Iterable[int]) -> list[int]:
        if self.ended:
            return []
        codes, self.ended = real_speech_codes(group, self.layout)
        return codes


__all__ = ["SpeechCodeFilter", "SpeechCodeLayout", "real_speech_codes"]
