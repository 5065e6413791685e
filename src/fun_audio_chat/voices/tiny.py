"""The tiny built-in voice cloner (no downloads): the tiny random S3 tokenizer and a tiny random speaker encoder,
sized for the tiny detokenizer, so that demos, notebooks and tests clone voices offline. Its voices are as
meaningless as the tiny models' speech, but they go through the same code path as real ones."""

from __future__ import annotations

from .cloning import VoiceCloner
from .speaker_encoder import OnnxSpeakerEncoder, tiny_speaker_encoder_model


class _CodesFoldedInto:
    """The tiny S3 tokenizer's codes (its FSQ always has 6561) folded into the tiny detokenizer's 296: a stand-in
    for "the tokenizer of the same release as the detokenizer", which the real models are."""

    def __init__(self, tokenizer, num_codes: int):
        self.tokenizer, self.num_codes = tokenizer, num_codes

    def __call__(self, audio, sampling_rate=None):
        return [[code % self.num_codes for code in codes] for codes in self.tokenizer(audio, sampling_rate)]


def tiny_voice_cloner(seed: int = 0) -> VoiceCloner:
    """A :class:`VoiceCloner` for :func:`fun_audio_chat.tiny.tiny_detokenizer` (random weights drawn from ``seed``)."""
    from ..tiny import TINY_SPEECH_CODES, tiny_s3_speech_tokenizer

    tokenizer = _CodesFoldedInto(tiny_s3_speech_tokenizer(), TINY_SPEECH_CODES)
    encoder = OnnxSpeakerEncoder(tiny_speaker_encoder_model(seed))
    return VoiceCloner(tokenizer, encoder, num_codes=TINY_SPEECH_CODES)


__all__ = ["tiny_voice_cloner"]
