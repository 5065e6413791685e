"""Clone a CosyVoice 3 voice from a short clip of one speaker (zero-shot: no training).

What CosyVoice 3's own frontend extracts from a prompt clip, made here from our parts:

* **prompt codes** — the clip's 25 Hz S3 v3 speech codes (:class:`~fun_audio_chat.processing.S3SpeechTokenizer`,
  the tokenizer Fun-Audio-Chat's speech head speaks in), from the clip at 16 kHz;
* **prompt mel** — CosyVoice 3's 80-bin mel of the clip at 24 kHz (:func:`~.features.prompt_mel`);
* **speaker embedding** — CAM++ (``campplus.onnx`` of the CosyVoice 3 folder, run by onnxruntime) on the clip's
  mean-normalised Kaldi fbank at 16 kHz (:class:`~.speaker_encoder.OnnxSpeakerEncoder`).

Codes and mel are then cut to a common length (two mel frames per code), as the official frontend does. The clip
must be 3 to 30 s long (the tokenizer takes at most 30 s in one piece; under 3 s the prompt carries little of the
voice) and must not be silent.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..processing.audio_io import AudioInputError, load_audio
from .features import COSYVOICE3_MEL, SPEAKER_SAMPLE_RATE, MelSettings, prompt_mel
from .speaker_encoder import SPEAKER_ENCODER_FILE, OnnxSpeakerEncoder

MIN_CLIP_SECONDS = 3.0
MAX_CLIP_SECONDS = 30.0
# A clip whose loudest sample stays below -60 dBFS holds no speech a speaker encoder could use.
SILENCE_PEAK_DBFS = -60.0
SPEECH_TOKENIZER_FILES = ("speech_tokenizer_v3.onnx", "speech_tokenizer_v3.batch.onnx")


class VoiceCloningError(ValueError):
    """A clip that cannot become a voice (too short, too long, silent, not audio); the message says the fix."""


def _peak_dbfs(waveform: np.ndarray) -> float:
    peak = float(np.max(np.abs(waveform))) if waveform.size else 0.0
    return 20 * math.log10(peak) if peak > 0 else -math.inf


class VoiceCloner:
    """Clip → :class:`~fun_audio_chat.token2wav.CosyVoice3Voice`.

    Args:
        speech_tokenizer: an :class:`~fun_audio_chat.processing.S3SpeechTokenizer` (CosyVoice 3's S3 v3), or any
            callable mapping a 16 kHz waveform to a list of codes (one list per clip).
        speaker_encoder: a callable mapping a 16 kHz waveform to a 192-value embedding (:class:`OnnxSpeakerEncoder`).
        num_codes: the detokenizer's speech-code vocabulary (6561 for the released model): codes outside it are an
            error, since a voice with them could never be used.
        mel_settings: the prompt mel recipe (CosyVoice 3's by default).
        token_mel_ratio: mel frames per speech code (2 for CosyVoice 3).

    Build one with :meth:`from_pretrained` (a CosyVoice 3 folder) or ``fun_audio_chat.voices.tiny_voice_cloner()``.
    """

    def __init__(
        self,
        speech_tokenizer,
        speaker_encoder,
        num_codes: int = 6561,
        mel_settings: MelSettings = COSYVOICE3_MEL,
        token_mel_ratio: int = 2,
        min_seconds: float = MIN_CLIP_SECONDS,
        max_seconds: float = MAX_CLIP_SECONDS,
    ):
        self.speech_tokenizer = speech_tokenizer
        self.speaker_encoder = speaker_encoder
        self.num_codes = int(num_codes)
        self.mel_settings = mel_settings
        self.token_mel_ratio = int(token_mel_ratio)
        self.min_seconds = float(min_seconds)
        self.max_seconds = float(max_seconds)

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike, speech_tokenizer=None, threads: int = 1, **kwargs
    ) -> VoiceCloner:
        """The cloner of a CosyVoice 3 checkpoint folder: its ``campplus.onnx`` speaker encoder and its
        ``speech_tokenizer_v3.onnx`` S3 tokenizer (or the ``speech_tokenizer`` given)."""
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder}: not a folder; pass a CosyVoice 3 checkpoint folder (it holds {SPEAKER_ENCODER_FILE} and "
                "speech_tokenizer_v3.onnx)."
            )
        if not (folder / SPEAKER_ENCODER_FILE).is_file():
            raise FileNotFoundError(
                f"{folder} has no {SPEAKER_ENCODER_FILE} (CosyVoice 3's CAM++ speaker encoder); pass the official "
                "CosyVoice 3 checkpoint folder, which ships it."
            )
        if speech_tokenizer is None:
            candidates = [folder / name for name in SPEECH_TOKENIZER_FILES if (folder / name).is_file()]
            if not candidates:
                raise FileNotFoundError(
                    f"{folder} has no speech_tokenizer_v3.onnx (the S3 v3 speech tokenizer); pass the official "
                    "CosyVoice 3 folder or speech_tokenizer=S3SpeechTokenizer.from_pretrained(PATH)."
                )
            from ..processing.speech_tokenizer import S3SpeechTokenizer

            speech_tokenizer = S3SpeechTokenizer.from_pretrained(candidates[0])
        return cls(speech_tokenizer, OnnxSpeakerEncoder(folder, threads=threads), **kwargs)

    # ------------------------------------------------------------------------------------------------ checks
    def load_clip(self, clip: Any, sampling_rate: int | None = None, name: str | None = None):
        """The clip at 16 kHz (codes, speaker embedding) and at 24 kHz (prompt mel), checked; raises
        :class:`VoiceCloningError` naming the problem and the fix."""
        label = name or (os.fspath(clip) if isinstance(clip, (str, os.PathLike)) else "the clip")
        try:
            at_16k = load_audio(clip, sampling_rate=sampling_rate, target_sampling_rate=SPEAKER_SAMPLE_RATE)
            at_24k = load_audio(clip, sampling_rate=sampling_rate, target_sampling_rate=self.mel_settings.sample_rate)
        except AudioInputError as err:
            raise VoiceCloningError(
                f"{label}: cannot clone a voice from it: {err} Pass a recording of one speaker (wav, flac, ogg, mp3 "
                "...; any sampling rate)."
            ) from err
        seconds = len(at_16k) / SPEAKER_SAMPLE_RATE
        if seconds < self.min_seconds:
            raise VoiceCloningError(
                f"{label}: the clip is {seconds:.1f} s long; a voice needs {self.min_seconds:g} to "
                f"{self.max_seconds:g} s of one speaker talking. Use a longer recording."
            )
        if seconds > self.max_seconds:
            raise VoiceCloningError(
                f"{label}: the clip is {seconds:.1f} s long; a voice takes at most {self.max_seconds:g} s (the "
                f"speech tokenizer's window). Cut it to {self.min_seconds:g}-{self.max_seconds:g} s of one speaker."
            )
        peak = _peak_dbfs(at_16k)
        if peak < SILENCE_PEAK_DBFS:
            level = "digital silence" if peak == -math.inf else f"its loudest sample is at {peak:.0f} dBFS"
            raise VoiceCloningError(
                f"{label}: the clip is silent ({level}); record the speaker, or raise the level of the recording."
            )
        return at_16k, at_24k

    # ------------------------------------------------------------------------------------------------ cloning
    def clone(self, clip: Any, name: str | None = None, sampling_rate: int | None = None):
        """A voice from a 3-30 s clip of one speaker (a path, bytes, an array with ``sampling_rate``, a datasets
        audio dict ... anything :func:`~fun_audio_chat.processing.load_audio` takes). ``name`` defaults to the
        file's stem (``"cloned"`` for in-memory audio)."""
        import torch

        from ..token2wav.voice import CosyVoice3Voice, align_prompt

        if name is None:
            name = Path(os.fspath(clip)).stem if isinstance(clip, (str, os.PathLike)) else "cloned"
        at_16k, at_24k = self.load_clip(clip, sampling_rate)
        codes = self._codes(at_16k)
        mel = prompt_mel(at_24k, self.mel_settings)
        codes, mel = align_prompt(torch.tensor(codes, dtype=torch.long), mel, self.token_mel_ratio)
        embedding = torch.as_tensor(self.speaker_encoder(at_16k), dtype=torch.float32).reshape(-1)
        return CosyVoice3Voice(name=name, speaker_embedding=embedding, prompt_codes=codes, prompt_mel=mel)

    __call__ = clone

    def _codes(self, waveform_16k: np.ndarray) -> list[int]:
        result = self.speech_tokenizer(waveform_16k, sampling_rate=SPEAKER_SAMPLE_RATE)
        codes = [int(code) for code in (result[0] if result and isinstance(result[0], (list, tuple)) else result)]
        bad = [code for code in codes if not 0 <= code < self.num_codes]
        if bad:
            raise VoiceCloningError(
                f"the speech tokenizer gave codes outside the detokenizer's [0, {self.num_codes}) (e.g. {bad[:3]}); "
                "clone with the S3 v3 tokenizer of the same CosyVoice 3 release as the detokenizer."
            )
        return codes


__all__ = [
    "MAX_CLIP_SECONDS",
    "MIN_CLIP_SECONDS",
    "VoiceCloner",
    "VoiceCloningError",
]
