"""Audio in and out of the HTTP API: inline base64 in, wav / flac / raw 16-bit PCM out.

Conversation audio is accepted only as inline base64 data: a request can never make the server open a path or
fetch a URL. Encoded audio is decoded from memory (soundfile: wav, mp3, flac, ogg/vorbis, opus), mixed to mono
and resampled to 16 kHz.
"""

from __future__ import annotations

import base64
import binascii
import io
import re

import numpy as np

INPUT_FORMATS = ("wav", "mp3", "flac", "ogg", "opus")
OUTPUT_FORMATS = ("wav", "flac", "pcm16")  # pcm16: raw little-endian 16-bit mono samples, no header
STREAM_OUTPUT_FORMATS = ("pcm16",)  # streamed audio comes in raw pieces, as in OpenAI's API

_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.IGNORECASE)
_LOOKS_LIKE_LOCATION = re.compile(r"^(https?|file|ftp|s3|gs)://|^[/~.]|^[A-Za-z]:\\", re.IGNORECASE)


class AudioRequestError(ValueError):
    """Unusable request audio; the message names the field and the fix."""


def decode_input_audio(data: str, audio_format: str | None, *, where: str, processor, max_seconds: float) -> np.ndarray:
    """A 16 kHz mono float32 waveform from an ``input_audio`` part (base64 ``data``, ``format``)."""
    if audio_format is not None and audio_format.lower() not in INPUT_FORMATS:
        raise AudioRequestError(
            f"{where}.format {audio_format!r} is not supported; use one of {', '.join(INPUT_FORMATS)}."
        )
    if not isinstance(data, str) or not data:
        raise AudioRequestError(f"{where}.data is empty; send the audio file's bytes as base64.")
    payload = _DATA_URL.sub("", data, count=1)
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        if _LOOKS_LIKE_LOCATION.match(data):
            raise AudioRequestError(
                f"{where}.data looks like a path or URL; this server accepts only inline base64 audio (it never "
                "reads files or fetches URLs for a request)."
            ) from err
        raise AudioRequestError(f"{where}.data is not valid base64 ({err}).") from err
    from ..processing import AudioInputError
    from ..processing.audio_io import TARGET_SAMPLING_RATE, load_audio

    try:
        waveform = load_audio(raw, name=f"{where}.data")
    except AudioInputError as err:
        reason = re.sub(r"Error opening <[^>]*>: ", "", str(err))  # soundfile names its in-memory buffer
        raise AudioRequestError(f"{reason} Send {'/'.join(INPUT_FORMATS)} audio as base64.") from err
    seconds = len(waveform) / TARGET_SAMPLING_RATE
    if seconds > max_seconds:
        raise AudioRequestError(
            f"{where} lasts {seconds:.1f} s, longer than this server's limit of {max_seconds:g} s per clip; "
            "send a shorter clip."
        )
    try:
        processor.load_audio((waveform, TARGET_SAMPLING_RATE), name=f"{where}.data")  # the model's own length rules
    except AudioInputError as err:
        raise AudioRequestError(str(err)) from err
    return waveform


def to_pcm16(samples: np.ndarray) -> bytes:
    """Float samples in [-1, 1] → little-endian int16 bytes (clipped, rounded)."""
    clipped = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    return np.round(clipped * 32767.0).astype("<i2").tobytes()


def encode_audio(samples: np.ndarray, sample_rate: int, audio_format: str) -> bytes:
    """The reply audio as a file (``wav``, ``flac``: 16-bit PCM) or raw ``pcm16`` bytes."""
    if audio_format == "pcm16":
        return to_pcm16(samples)
    import soundfile as sf

    pcm = np.frombuffer(to_pcm16(samples), dtype="<i2")
    buffer = io.BytesIO()
    sf.write(buffer, pcm, sample_rate, format=audio_format.upper(), subtype="PCM_16")
    return buffer.getvalue()


__all__ = [
    "AudioRequestError",
    "INPUT_FORMATS",
    "OUTPUT_FORMATS",
    "STREAM_OUTPUT_FORMATS",
    "decode_input_audio",
    "encode_audio",
    "to_pcm16",
]
