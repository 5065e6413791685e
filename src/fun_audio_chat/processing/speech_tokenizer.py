"""S3Tokenizer wrapper: 16 kHz audio → 25 Hz CosyVoice 3 speech codes in ``[0, 6561)`` (assistant speech of
training data; inference never needs it).

Uses the PyPI package ``s3tokenizer`` (model ``speech_tokenizer_v3_25hz`` = ``S3TokenizerV3``). It is an optional
dependency: install it **without its declared dependencies** plus the two it really needs::

    pip install --no-deps s3tokenizer==0.3.0 && pip install onnx einops      # or: pip install "fun-audio-chat[speech-tokenizer]"

``s3tokenizer`` declares (and imports) ``torchaudio``, but only uses it in its own ``load_audio`` file helper.
torchaudio has no build for torch >= 2.12 and a broken torchaudio also breaks ``import transformers``, so
:func:`import_s3tokenizer` — the one place in this library that touches it — imports s3tokenizer with a stand-in
``torchaudio`` module placed in ``sys.modules`` for the duration of that import only (when no working torchaudio is
installed). The stand-in raises a clear error if s3tokenizer's file loader is ever called; we load audio with
soundfile instead (:mod:`.audio_io`).

Long audio follows the official Fun-Audio-Chat data pipeline (docs/official-format.md#speech-tokenizer): hard 30 s segments, a last segment under
1 s is merged with the previous one and the pair split in half, codes concatenated. (s3tokenizer's own long-audio mode,
overlapping windows, is available with ``long_audio="s3tokenizer"``.)
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from typing import Any

import numpy as np

from ..speech_codes import SPEECH_FRAME_RATE
from .audio_io import TARGET_SAMPLING_RATE, is_single_audio, load_audio

S3_MODEL_NAME = "speech_tokenizer_v3_25hz"
S3_NUM_CODES = 6561
SEGMENT_SECONDS = 30
MIN_LAST_SEGMENT_SECONDS = 1

_INSTALL_HINT = (
    "Speech tokenization needs the optional `s3tokenizer` package. Install it without its declared dependencies "
    "(it pins torchaudio, which cannot load next to torch >= 2.12): "
    "`pip install --no-deps s3tokenizer==0.3.0 && pip install onnx einops` "
    '(the extra `pip install "fun-audio-chat[speech-tokenizer]"` installs onnx and einops).'
)


def _torchaudio_stub() -> types.ModuleType:
    stub = types.ModuleType("torchaudio")
    stub.__fun_audio_chat_stub__ = True

    def _unavailable(*args, **kwargs):
        raise RuntimeError(
            "torchaudio is not available (fun_audio_chat imported s3tokenizer with a stand-in module). Load audio "
            "with fun_audio_chat.processing.load_audio and pass waveforms to S3SpeechTokenizer instead of paths."
        )

    stub.load = _unavailable
    stub.transforms = types.SimpleNamespace(Resample=_unavailable)
    return stub


def _torchaudio_works() -> bool:
    if "torchaudio" in sys.modules:
        return not getattr(sys.modules["torchaudio"], "__fun_audio_chat_stub__", False)
    if importlib.util.find_spec("torchaudio") is None:
        return False
    try:
        importlib.import_module("torchaudio")
    except Exception:  # a torchaudio built for another torch fails with OSError/RuntimeError/ImportError
        for name in [m for m in sys.modules if m == "torchaudio" or m.startswith("torchaudio.")]:
            del sys.modules[name]
        return False
    return True


def import_s3tokenizer():
    """Import and return the ``s3tokenizer`` module, working around its torchaudio import (see module docstring)."""
    if "s3tokenizer" in sys.modules:
        return sys.modules["s3tokenizer"]
    if importlib.util.find_spec("s3tokenizer") is None:
        raise ImportError(_INSTALL_HINT)
    if _torchaudio_works():
        return importlib.import_module("s3tokenizer")
    sys.modules["torchaudio"] = _torchaudio_stub()
    try:
        module = importlib.import_module("s3tokenizer")
    except ImportError as err:
        raise ImportError(f"{_INSTALL_HINT} (import failed: {err})") from err
    finally:
        # The stand-in only served s3tokenizer's own import; nothing else should see it.
        if getattr(sys.modules.get("torchaudio"), "__fun_audio_chat_stub__", False):
            del sys.modules["torchaudio"]
    return module


def _model_class_and_config(name: str):
    """Model class and config class for an s3tokenizer model name or file name (v3 unless it says v1/v2)."""
    s3 = import_s3tokenizer()
    lowered = os.path.basename(str(name)).lower()
    if "v2" in lowered:
        from s3tokenizer.model_v2 import ModelConfig

        return s3.S3TokenizerV2, ModelConfig
    if "v1" in lowered:
        from s3tokenizer.model import ModelConfig

        return s3.S3Tokenizer, ModelConfig
    from s3tokenizer.model_v3 import ModelConfigV3

    return s3.S3TokenizerV3, ModelConfigV3


class S3SpeechTokenizer:
    """Batch speech tokenizer (CosyVoice 3's S3Tokenizer v3 by default).

    Build it with :meth:`from_pretrained` (a local ``.onnx``/``.pt``/``.safetensors`` file, or a model name such as
    ``"speech_tokenizer_v3_25hz"`` which s3tokenizer downloads — needs a network) or :meth:`random` (random weights,
    offline, for tests and demos). Call it on a list of audios (any form :func:`load_audio` accepts; raw arrays are
    taken as 16 kHz unless ``sampling_rate`` is given) to get one list of 25 Hz codes per clip.
    """

    sampling_rate = TARGET_SAMPLING_RATE
    frame_rate = SPEECH_FRAME_RATE

    def __init__(self, model: Any, device: str | None = None, batch_size: int = 8, long_audio: str = "official"):
        import torch

        if long_audio not in ("official", "s3tokenizer"):
            raise ValueError(f"long_audio must be 'official' or 's3tokenizer', got {long_audio!r}")
        self.model = model.eval()
        if device is not None:
            self.model = self.model.to(device)
        first = next(iter(self.model.parameters()), None)
        self.device = (
            torch.device(device) if device is not None else (first.device if first is not None else torch.device("cpu"))
        )
        self.batch_size = int(batch_size)
        self.long_audio = long_audio
        self.num_codes = int(getattr(getattr(model, "config", None), "n_codebook_size", S3_NUM_CODES))
        self.n_mels = int(getattr(getattr(model, "config", None), "n_mels", 128))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike = S3_MODEL_NAME,
        download_root: str | None = None,
        config: Any = None,
        **kwargs,
    ):
        """Load from a local ``.onnx`` (official weights), a ``.pt``/``.pth``/``.bin`` torch state dict, a
        ``.safetensors`` file, or an s3tokenizer model name (downloaded by s3tokenizer into ``download_root``).
        The architecture is v3 unless the file name says v1/v2; ``config`` overrides its size (for state dicts of
        non-standard models)."""
        s3 = import_s3tokenizer()
        path = os.fspath(name_or_path)
        if os.path.isfile(path):
            model_class, config_class = _model_class_and_config(path)
            model = model_class(os.path.basename(path), config=config if config is not None else config_class())
            if path.endswith(".onnx"):
                model.init_from_onnx(path)
            elif path.endswith(".safetensors"):
                from safetensors.torch import load_file

                model.load_state_dict(load_file(path), strict=True)
            else:
                import torch

                state = torch.load(path, map_location="cpu", weights_only=True)
                model.load_state_dict(state, strict=True)
        elif path in s3.available_models():
            try:
                model = s3.load_model(path, download_root=download_root)
            except Exception as err:
                raise OSError(
                    f"Could not download the S3 tokenizer {path!r} (it comes from modelscope; is the machine "
                    f"online?): {err}. Download speech_tokenizer_v3.onnx yourself and pass its path."
                ) from err
        else:
            raise FileNotFoundError(
                f"{path!r} is neither a file nor an s3tokenizer model name ({s3.available_models()})."
            )
        return cls(model, **kwargs)

    @classmethod
    def random(cls, name: str = S3_MODEL_NAME, seed: int = 0, config: Any = None, **kwargs):
        """A randomly initialised tokenizer of the given architecture (no download). ``config`` overrides the
        architecture (e.g. a smaller ``ModelConfigV3`` for fast tests); a fresh config object is always used."""
        import torch

        model_class, config_class = _model_class_and_config(name)
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            model = model_class(name, config=config if config is not None else config_class())
        finally:
            torch.random.set_rng_state(generator_state)
        return cls(model, **kwargs)

    # ------------------------------------------------------------------ tokenization
    def log_mel(self, waveform: np.ndarray):
        import torch

        s3 = import_s3tokenizer()
        return s3.log_mel_spectrogram(
            torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32)), n_mels=self.n_mels
        )

    def _segments(self, waveform: np.ndarray) -> list[np.ndarray]:
        if self.long_audio != "official":
            return [waveform]
        size = SEGMENT_SECONDS * self.sampling_rate
        if len(waveform) <= size:
            return [waveform]
        pieces = [waveform[start : start + size] for start in range(0, len(waveform), size)]
        if len(pieces) > 1 and len(pieces[-1]) < MIN_LAST_SEGMENT_SECONDS * self.sampling_rate:
            merged = np.concatenate([pieces[-2], pieces[-1]])
            half = len(merged) // 2
            pieces = pieces[:-2] + [merged[:half], merged[half:]]
        return pieces

    def _quantize(self, waveforms: list[np.ndarray]) -> list[list[int]]:
        import torch

        s3 = import_s3tokenizer()
        out: list[list[int]] = []
        for start in range(0, len(waveforms), self.batch_size):
            chunk = waveforms[start : start + self.batch_size]
            mels = [self.log_mel(w) for w in chunk]
            mel, mel_len = s3.padding(mels)
            with torch.inference_mode():
                codes, code_len = self.model.quantize(mel.to(self.device), mel_len.to(self.device))
            codes = codes.detach().cpu().clone()
            for row, length in enumerate(code_len.tolist()):
                out.append([int(c) for c in codes[row, :length].tolist()])
        return out

    def __call__(self, audios: Any, sampling_rate: int | None = None) -> list[list[int]]:
        """Codes of one audio or a list of audios; returns one list of ints per clip."""
        single = is_single_audio(audios)
        items = [audios] if single else list(audios)
        rate = self.sampling_rate if sampling_rate is None else sampling_rate
        waveforms = [load_audio(a, sampling_rate=rate, name=f"audio {i}") for i, a in enumerate(items)]
        segments, owners = [], []
        for index, waveform in enumerate(waveforms):
            for piece in self._segments(waveform):
                segments.append(piece)
                owners.append(index)
        codes = self._quantize(segments)
        result: list[list[int]] = [[] for _ in waveforms]
        for owner, piece_codes in zip(owners, codes):
            result[owner].extend(piece_codes)
        return result

    tokenize = __call__


__all__ = ["S3_MODEL_NAME", "S3SpeechTokenizer", "import_s3tokenizer"]
