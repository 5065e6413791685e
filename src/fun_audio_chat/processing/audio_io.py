"""Audio input: load, decode, downmix, resample and validate.

Everything the processor accepts as "an audio" goes through :func:`load_audio`, which returns a mono float32
waveform at 16 kHz (the rate of the Whisper-style feature extractor and of the S3 speech tokenizer):

* a path (``str`` / ``os.PathLike``) to a file soundfile can read (wav, flac, ogg/vorbis, opus, mp3 with recent
  libsndfile, ...), or an ``http(s)://`` URL (fetched with ``urllib``; needs a network). Both can be turned off
  with an :class:`AudioLoadingPolicy` (a server that takes conversations from users should refuse them), and a
  download has a total time limit and a size limit, not only a per-read timeout;
* encoded file bytes (``bytes`` / ``bytearray`` / ``memoryview``);
* raw samples (numpy array, torch tensor, list of floats) **with** ``sampling_rate`` (an integer number of Hz);
  int16/int32/uint8 PCM is scaled to [-1, 1]; a 2-D array is one multichannel clip, (channels, time) or
  (time, channels) (the axis of at most 32 is the channel axis), and its channels are averaged to mono;
* a ``(samples, sampling_rate)`` tuple;
* a ``datasets`` audio dict: ``{"array", "sampling_rate"}`` (decoded) or ``{"path", "bytes"}`` (``Audio(decode=False)``);
* a decoder object with ``get_all_samples()`` (what ``datasets.Audio`` returns when torchcodec is installed).

Resampling uses ``soxr`` (high quality). Invalid audio raises :class:`AudioInputError` (a ``ValueError``) with a
message that says what is wrong; that includes a WAV file holding fewer frames than its header declares
(a truncated download or copy), which would otherwise decode to a shorter clip without a word.
"""

from __future__ import annotations

import io
import math
import os
import struct
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..speech_codes import SPEECH_FRAME_RATE

TARGET_SAMPLING_RATE = 16000

_MAX_CHANNELS = 32  # an axis this short is treated as the channel axis of a 2-D array


class AudioInputError(ValueError):
    """An audio input that cannot be used (missing file, unknown rate, empty, NaN samples, ...)."""


@dataclass(frozen=True)
class AudioLoadingPolicy:
    """Which audio sources :func:`load_audio` may open, and the limits of a download.

    The default allows local paths and URLs (what a library user loading their own files wants). A server that
    takes conversations from users should refuse both, so that a request cannot make it read its own files or
    fetch from its network: ``AudioLoadingPolicy(allow_local_paths=False, allow_urls=False)`` (bytes, arrays and
    decoded datasets audio still work), set on the processor as ``processor.audio_loading_policy``.

    Args:
        allow_local_paths: open paths on this machine (also a datasets ``{"path": ...}`` dict without bytes).
        allow_urls: download ``http(s)://`` URLs.
        url_timeout_seconds: the longest wait for the server at connection and for each read.
        url_max_seconds: total time limit of one download (a server that trickles bytes is cut off).
        url_max_bytes: size limit of one download (checked against Content-Length first, then while reading).
    """

    allow_local_paths: bool = True
    allow_urls: bool = True
    url_timeout_seconds: float = 30.0
    url_max_seconds: float = 120.0
    url_max_bytes: int = 256 * 2**20

    @classmethod
    def in_memory_only(cls) -> AudioLoadingPolicy:
        """Neither paths nor URLs: only bytes, arrays and decoded audio (for servers)."""
        return cls(allow_local_paths=False, allow_urls=False)


DEFAULT_AUDIO_LOADING_POLICY = AudioLoadingPolicy()


def _sampling_rate(value: Any, name: str | None) -> int:
    """An integer rate in Hz from an int, an integral float or numpy scalar; anything else is named as wrong."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise AudioInputError(
            f"{_describe(name)}sampling_rate must be an integer number of Hz such as 16000, got {value!r}."
        )
    if not math.isfinite(float(value)) or float(value) != int(value) or int(value) <= 0:
        raise AudioInputError(
            f"{_describe(name)}sampling_rate must be a positive whole number of Hz such as 16000, got {value!r}."
        )
    return int(value)


def _describe(name: str | None) -> str:
    return f"{name}: " if name else ""


def resample(
    waveform: np.ndarray, orig_sampling_rate: int, target_sampling_rate: int = TARGET_SAMPLING_RATE
) -> np.ndarray:
    """Resample a mono float waveform with soxr (``HQ``). Returns float32; no-op when the rates are equal."""
    waveform = np.asarray(waveform, dtype=np.float32)
    if int(orig_sampling_rate) == int(target_sampling_rate):
        return waveform
    import soxr

    out = soxr.resample(waveform, int(orig_sampling_rate), int(target_sampling_rate), quality="HQ")
    return np.ascontiguousarray(out, dtype=np.float32)


def _to_float(samples: np.ndarray, name: str | None) -> np.ndarray:
    """Scale integer PCM to [-1, 1]; keep float data; reject other dtypes."""
    if samples.dtype == np.bool_ or samples.dtype.kind in "OUSV":
        raise AudioInputError(f"{_describe(name)}audio samples must be numbers, got dtype {samples.dtype}.")
    if samples.dtype.kind == "u":
        bits = samples.dtype.itemsize * 8
        offset = 2 ** (bits - 1)
        return ((samples.astype(np.float64) - offset) / offset).astype(np.float32)
    if samples.dtype.kind == "i":
        bits = samples.dtype.itemsize * 8
        return (samples.astype(np.float64) / float(2 ** (bits - 1))).astype(np.float32)
    if samples.dtype.kind == "c":
        raise AudioInputError(f"{_describe(name)}audio samples must be real, got complex dtype {samples.dtype}.")
    return samples.astype(np.float32, copy=False)


def to_mono(samples: np.ndarray, name: str | None = None) -> np.ndarray:
    """Average channels. 1-D input is returned as is; 2-D input may be (channels, time) or (time, channels)."""
    if samples.ndim == 1:
        return samples
    if samples.ndim == 2:
        rows, cols = samples.shape
        if rows == 1 or cols == 1:
            return samples.reshape(-1)
        if rows <= _MAX_CHANNELS and cols > rows:
            return samples.mean(axis=0)
        if cols <= _MAX_CHANNELS and rows > cols:
            return samples.mean(axis=1)
        raise AudioInputError(
            f"{_describe(name)}cannot tell the channel axis of a {samples.shape} audio array; pass mono samples or "
            "a (channels, time) array with at most 32 channels."
        )
    raise AudioInputError(
        f"{_describe(name)}audio arrays must be 1-D (time) or 2-D (channels x time), got shape {samples.shape}."
    )


def validate_waveform(waveform: np.ndarray, name: str | None = None, sampling_rate: int = TARGET_SAMPLING_RATE) -> None:
    """Raise :class:`AudioInputError` for empty audio or NaN/inf samples."""
    if waveform.size == 0:
        raise AudioInputError(f"{_describe(name)}audio is empty (0 samples).")
    if not np.all(np.isfinite(waveform)):
        bad = int(np.count_nonzero(~np.isfinite(waveform)))
        raise AudioInputError(
            f"{_describe(name)}audio contains {bad} NaN or infinite sample(s) out of {waveform.size}; "
            "clean the signal before passing it."
        )


def wav_declared_frames(head: bytes) -> int | None:
    """Frame count a RIFF/WAVE header declares (``data`` chunk size / block align), from the first bytes of a
    file; ``None`` when ``head`` is not a WAV header or the size is unknown (streamed WAVs write 0 or 0xFFFFFFFF;
    RF64 keeps the size elsewhere)."""
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    position, block_align = 12, None
    while position + 8 <= len(head):
        chunk_id = head[position : position + 4]
        (size,) = struct.unpack("<I", head[position + 4 : position + 8])
        if chunk_id == b"fmt " and position + 22 <= len(head):
            (block_align,) = struct.unpack("<H", head[position + 20 : position + 22])
        elif chunk_id == b"data":
            if not block_align or size in (0, 0xFFFFFFFF):
                return None
            return size // block_align
        position += 8 + size + (size & 1)
    return None


_WAV_HEADER_BYTES = 1 << 16  # enough for fmt, fact, LIST... chunks before data


def _check_complete(frames: int, head: bytes, name: str | None, what: str) -> None:
    declared = wav_declared_frames(head)
    if declared is not None and frames < declared:
        raise AudioInputError(
            f"{_describe(name)}{what} is truncated: its WAV header declares {declared} frames but it holds {frames} "
            f"({100 * frames / declared:.0f}%); re-download or re-export the file."
        )


def _read_encoded(source: Any, name: str | None, what: str, head: bytes = b"") -> tuple[np.ndarray, int]:
    import soundfile as sf

    try:
        data, sampling_rate = sf.read(source, dtype="float32", always_2d=True)
    except Exception as err:  # soundfile raises LibsndfileError / RuntimeError / TypeError
        raise AudioInputError(f"{_describe(name)}could not decode {what}: {err}") from err
    _check_complete(data.shape[0], head, name, what)
    return data.T, int(sampling_rate)  # (channels, time)


def read_audio_file(path: str | os.PathLike, name: str | None = None) -> tuple[np.ndarray, int]:
    """Read an audio file with soundfile. Returns ``(samples (channels, time) float32, sampling_rate)``."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise AudioInputError(f"{_describe(name)}audio file not found: {path!r}")
    if os.path.isdir(path):
        raise AudioInputError(f"{_describe(name)}expected an audio file but {path!r} is a directory")
    try:
        with open(path, "rb") as handle:
            head = handle.read(_WAV_HEADER_BYTES)
    except OSError as err:
        raise AudioInputError(f"{_describe(name)}cannot read audio file {path!r}: {err.strerror or err}") from err
    return _read_encoded(path, name, f"audio file {path!r} (not a readable audio file?)", head)


def decode_audio_bytes(data: bytes | bytearray | memoryview, name: str | None = None) -> tuple[np.ndarray, int]:
    """Decode an encoded audio file held in memory. Returns ``(samples (channels, time), sampling_rate)``."""
    data = bytes(data)
    if len(data) == 0:
        raise AudioInputError(f"{_describe(name)}audio bytes are empty.")
    return _read_encoded(
        io.BytesIO(data), name, f"{len(data)} bytes of audio (not an audio file?)", data[:_WAV_HEADER_BYTES]
    )


def _fetch_url(url: str, name: str | None, policy: AudioLoadingPolicy = DEFAULT_AUDIO_LOADING_POLICY) -> bytes:
    """Download with a total time limit and a size limit (a per-read timeout alone lets a server that sends a
    byte now and then hold the caller forever)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + policy.url_max_seconds
    limit = policy.url_max_bytes

    def fail(why: str) -> AudioInputError:
        return AudioInputError(f"{_describe(name)}could not download audio from {url!r}: {why}")

    try:
        timeout = min(policy.url_timeout_seconds, policy.url_max_seconds)
        with urllib.request.urlopen(url, timeout=timeout) as response:  # the policy allows URLs
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise fail(f"it is {int(declared)} bytes, more than the {limit}-byte limit (url_max_bytes).")
            parts, size = [], 0
            while True:
                if time.monotonic() > deadline:
                    raise fail(
                        f"not finished after {policy.url_max_seconds:g} s ({size} bytes so far; url_max_seconds). "
                        "Download it and pass the local path."
                    )
                part = response.read1(1 << 16)
                if not part:
                    break
                size += len(part)
                if size > limit:
                    raise fail(f"more than the {limit}-byte limit (url_max_bytes).")
                parts.append(part)
            return b"".join(parts)
    except AudioInputError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise fail(f"{err}. Download it and pass the local path.") from err


def _is_url(value: str) -> bool:
    return value.startswith(("http://", "https://"))


def load_audio(
    audio: Any,
    sampling_rate: int | None = None,
    target_sampling_rate: int = TARGET_SAMPLING_RATE,
    name: str | None = None,
    policy: AudioLoadingPolicy | None = None,
) -> np.ndarray:
    """Load any supported audio input as a mono float32 waveform at ``target_sampling_rate``.

    Args:
        audio: see the module docstring for the accepted forms.
        sampling_rate: rate of raw sample arrays. Required for them (there is no safe default); ignored for
            files and bytes, which carry their own rate. A dict's own ``sampling_rate`` wins over this argument.
        target_sampling_rate: output rate (16 kHz for Fun-Audio-Chat).
        name: how to refer to this input in error messages (e.g. ``"audio 2"``).
        policy: which sources may be opened and the download limits (default: paths and URLs allowed).
    """
    samples, rate = _load_samples(audio, sampling_rate, name, policy or DEFAULT_AUDIO_LOADING_POLICY)
    if rate is None or rate <= 0:
        raise AudioInputError(f"{_describe(name)}invalid sampling rate {rate!r}.")
    samples = to_mono(_to_float(np.asarray(samples), name), name)
    validate_waveform(samples, name)
    waveform = resample(samples, int(rate), target_sampling_rate)
    validate_waveform(waveform, name)
    return waveform


def _load_samples(
    audio: Any, sampling_rate: int | None, name: str | None, policy: AudioLoadingPolicy
) -> tuple[np.ndarray, int | None]:
    if audio is None:
        raise AudioInputError(f"{_describe(name)}audio is None.")
    if isinstance(audio, (str, os.PathLike)):
        text = os.fspath(audio)
        if isinstance(text, str) and _is_url(text):
            if not policy.allow_urls:
                raise AudioInputError(
                    f"{_describe(name)}audio URLs are not allowed here (allow_urls=False); send the audio itself."
                )
            return decode_audio_bytes(_fetch_url(text, name, policy), name)
        if not policy.allow_local_paths:
            raise AudioInputError(
                f"{_describe(name)}audio file paths are not allowed here (allow_local_paths=False); send the audio "
                "itself (bytes or samples)."
            )
        return read_audio_file(text, name)
    if isinstance(audio, (bytes, bytearray, memoryview)):
        return decode_audio_bytes(audio, name)
    if isinstance(audio, dict):
        return _load_from_dict(audio, sampling_rate, name, policy)
    if (
        isinstance(audio, tuple)
        and len(audio) == 2
        and isinstance(audio[1], (int, np.integer))
        and not isinstance(audio[1], bool)
    ):
        return _raw_samples(audio[0], int(audio[1]), name)
    if hasattr(audio, "get_all_samples"):  # torchcodec / datasets AudioDecoder
        decoded = audio.get_all_samples()
        data = decoded.data
        data = data.detach().cpu().numpy() if hasattr(data, "detach") else np.asarray(data)
        return data, int(decoded.sample_rate)
    return _raw_samples(audio, sampling_rate, name)


def _raw_samples(samples: Any, sampling_rate: int | None, name: str | None) -> tuple[np.ndarray, int]:
    if hasattr(samples, "detach"):  # torch tensor
        samples = samples.detach().cpu()
        if str(samples.dtype) == "torch.bfloat16":
            samples = samples.float()
        samples = samples.numpy()
    try:
        array = np.asarray(samples)
    except Exception as err:
        raise AudioInputError(f"{_describe(name)}unsupported audio input of type {type(samples).__name__}.") from err
    if array.dtype.kind in "OUSV":
        raise AudioInputError(
            f"{_describe(name)}unsupported audio input of type {type(samples).__name__}; pass a path, bytes, "
            "an array with sampling_rate, or a datasets audio dict."
        )
    if sampling_rate is None:
        raise AudioInputError(
            f"{_describe(name)}the sampling rate of a raw audio array is unknown; pass sampling_rate=... "
            '(or {"array": ..., "sampling_rate": ...}).'
        )
    return array, _sampling_rate(sampling_rate, name)


def _load_from_dict(
    audio: dict, sampling_rate: int | None, name: str | None, policy: AudioLoadingPolicy
) -> tuple[np.ndarray, int | None]:
    if audio.get("array") is not None:
        rate = audio.get("sampling_rate", sampling_rate)
        if rate is None:
            raise AudioInputError(
                f'{_describe(name)}audio dict has an "array" but no "sampling_rate"; the rate of raw samples is unknown.'
            )
        return _raw_samples(audio["array"], _sampling_rate(rate, name), name)
    if audio.get("bytes") is not None:
        return decode_audio_bytes(audio["bytes"], name)
    if audio.get("path") is not None:
        return _load_samples(audio["path"], sampling_rate, name, policy)
    raise AudioInputError(
        f'{_describe(name)}audio dict needs "array" + "sampling_rate", "bytes" or "path"; got keys {sorted(audio)}.'
    )


# A short spoken request bundled with the package (espeak-ng, 16 kHz mono PCM), for demos and examples.
EXAMPLE_AUDIO_TEXT = "Hello! What is the weather like in Paris today?"


def example_audio_path() -> str:
    """Path of the bundled example clip ``assets/hello.wav`` (its words are :data:`EXAMPLE_AUDIO_TEXT`)."""
    from importlib import resources

    return str(resources.files("fun_audio_chat").joinpath("assets", "hello.wav"))


def speech_frames(
    num_samples: int, sampling_rate: int = TARGET_SAMPLING_RATE, frame_rate: int = SPEECH_FRAME_RATE
) -> int:
    """Number of 25 Hz speech frames of a clip, as the official processor counts them: ``int(duration * 25)``."""
    return int(num_samples / sampling_rate * frame_rate)


def is_single_audio(audio: Any) -> bool:
    """True when ``audio`` is one clip (a path, URL, bytes, datasets dict, ``(array, rate)`` pair, decoder, 1-D array
    or list of numbers), False for a list of clips."""
    if isinstance(audio, (str, os.PathLike, bytes, bytearray, memoryview, dict)):
        return True
    if isinstance(audio, tuple) and len(audio) == 2 and isinstance(audio[1], (int, np.integer)):
        return True
    if hasattr(audio, "get_all_samples"):
        return True
    if isinstance(audio, np.ndarray) or hasattr(audio, "detach"):
        return audio.ndim == 1
    if isinstance(audio, (list, tuple)):
        return len(audio) > 0 and all(isinstance(x, (int, float, np.number)) for x in audio[:16])
    return False


def is_raw_array(audio: Any) -> bool:
    """A bare sample array (numpy, torch or a list of numbers), which carries no sampling rate of its own."""
    if isinstance(audio, np.ndarray) or hasattr(audio, "detach"):
        return True
    return (
        isinstance(audio, list) and len(audio) > 0 and all(isinstance(x, (int, float, np.number)) for x in audio[:16])
    )


__all__ = [
    "DEFAULT_AUDIO_LOADING_POLICY",
    "EXAMPLE_AUDIO_TEXT",
    "TARGET_SAMPLING_RATE",
    "AudioInputError",
    "AudioLoadingPolicy",
    "decode_audio_bytes",
    "example_audio_path",
    "is_raw_array",
    "is_single_audio",
    "load_audio",
    "read_audio_file",
    "resample",
    "speech_frames",
    "to_mono",
    "validate_waveform",
    "wav_declared_frames",
]
