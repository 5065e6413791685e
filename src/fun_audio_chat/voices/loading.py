"""Which voice cloner a command-line ``--encoders`` / ``--voice-encoders`` value means."""

from __future__ import annotations

import os

from .cloning import VoiceCloner
from .tiny import tiny_voice_cloner


def load_voice_cloner(spec: str | os.PathLike, num_codes: int | None = None) -> VoiceCloner:
    """``"tiny"`` (the offline tiny cloner, for the tiny detokenizer) or a CosyVoice 3 checkpoint folder holding
    ``campplus.onnx`` and ``speech_tokenizer_v3.onnx``. ``num_codes`` is the detokenizer's code vocabulary."""
    if os.fspath(spec) == "tiny":
        return tiny_voice_cloner()
    return VoiceCloner.from_pretrained(spec, **({} if num_codes is None else {"num_codes": num_codes}))


__all__ = ["load_voice_cloner"]
