"""From generated ids to text, speech codes and waveforms.

* :func:`clean_text_ids` — drop padding and the control tokens around a reply (the official demo strips a leading
  ``<|audio_bos|>``/``<|sil|>`` run and a trailing ``<|audio_eos|>``/``<|sil|>``/``<|im_end|>`` run).
* :func:`speech_ids_to_codes` — generated speech ids to per-row lists of real codes (stop at speech EOS, drop
  BOS/pad and anything outside ``[0, num_codes)``).
* :class:`SpeechDetokenizer` — the protocol of a codes → waveform vocoder; :class:`CosyVoice3Detokenizer` adapts the
  CosyVoice 3 flow-matching + HiFT model the official code uses (24 kHz), imported lazily.
* :func:`save_audio` — write a waveform with soundfile.
"""

from __future__ import annotations

import os
import uuid as uuid_lib
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

COSYVOICE3_SAMPLING_RATE = 24000
# Offline token2wav of the official code: 30 s segments (750 tokens at 25 Hz); a last segment under 2 s (50 tokens)
# is merged with the previous one and the pair is split in half; 3 tokens of look-ahead (SPEC §6.3).
COSYVOICE3_SEGMENT_TOKENS = 750
COSYVOICE3_MIN_LAST_SEGMENT = 50
COSYVOICE3_PRE_LOOKAHEAD = 3
COSYVOICE3_DEFAULT_SPEAKER = "中文女"


def clean_text_ids(
    ids: Iterable[int],
    leading: Iterable[int] = (),
    trailing: Iterable[int] = (),
    padding: Iterable[int] = (),
) -> list[int]:
    """Remove ``padding`` ids anywhere, then a run of ``leading`` ids at the start and of ``trailing`` ids at the end."""
    pad, lead, trail = set(padding), set(leading), set(trailing)
    out = [int(i) for i in ids if int(i) not in pad]
    start, end = 0, len(out)
    while start < end and out[start] in lead:
        start += 1
    while end > start and out[end - 1] in trail:
        end -= 1
    return out[start:end]


def _to_list(x: Any) -> list:
    if x is None:
        return None
    if hasattr(x, "detach"):
        return x.detach().cpu().tolist()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return list(x)


def speech_ids_to_codes(
    speech_ids: Any,
    num_codes: int,
    eos_token_id: int | None = None,
    attention_mask: Any = None,
    lengths: Sequence[int] | None = None,
) -> list[list[int]]:
    """Generated speech ids (B, S) or (S,) → one list of codes per row.

    Positions past ``lengths[b]`` or where ``attention_mask`` is 0 are ignored; each row stops at its first
    ``eos_token_id``; ids outside ``[0, num_codes)`` (speech BOS delay codes, pad) are dropped.
    """
    rows = _to_list(speech_ids)
    if rows is None:
        return []
    if len(rows) == 0:
        return []
    if not isinstance(rows[0], (list, tuple)):
        rows = [rows]
        attention_mask = None if attention_mask is None else [_to_list(attention_mask)]
    else:
        attention_mask = _to_list(attention_mask)
    lengths = _to_list(lengths)
    result = []
    for b, row in enumerate(rows):
        row = [int(x) for x in row]
        if lengths is not None:
            row = row[: int(lengths[b])]
        if attention_mask is not None:
            row = [x for x, keep in zip(row, attention_mask[b]) if keep]
        if eos_token_id is not None and eos_token_id in row:
            row = row[: row.index(eos_token_id)]
        result.append([x for x in row if 0 <= x < num_codes])
    return result


@runtime_checkable
class SpeechDetokenizer(Protocol):
    """Turns 25 Hz speech codes into a waveform.

    Implementations have a ``sampling_rate`` attribute and are callable on one list of codes, returning a 1-D float32
    numpy waveform at that rate.
    """

    sampling_rate: int

    def __call__(self, codes: Sequence[int]) -> np.ndarray: ...


def split_for_token2wav(
    num_tokens: int, segment: int = COSYVOICE3_SEGMENT_TOKENS, min_last: int = COSYVOICE3_MIN_LAST_SEGMENT
) -> list[tuple[int, int]]:
    """``(start, end)`` token segments of the official offline token2wav: ``segment``-token pieces; a last piece
    shorter than ``min_last`` is merged with the previous one and the pair is split into two halves."""
    if num_tokens <= 0:
        return []
    bounds = [(start, min(start + segment, num_tokens)) for start in range(0, num_tokens, segment)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < min_last:
        start = bounds[-2][0]
        middle = start + (num_tokens - start) // 2
        bounds = bounds[:-2] + [(start, middle), (middle, num_tokens)]
    return bounds


class CosyVoice3Detokenizer:
    """Adapter for the CosyVoice 3 token-to-wave model (flow matching to mel, HiFT vocoder, 24 kHz).

    Needs the ``cosyvoice`` package (github FunAudioLLM/CosyVoice, not on PyPI as such) importable and a local
    ``Fun-CosyVoice3-0.5B-2512`` model directory. It follows the official Fun-Audio-Chat detokenizer: full attention
    inside 30 s windows (``static_chunk_size = 2 * 750``), no prompt speech, a fixed speaker embedding, 750-token
    segments decoded with 3 tokens of look-ahead.

    Args:
        model_dir: the CosyVoice 3 model directory.
        speaker_embedding: (1, 192) speaker embedding tensor/array; or
        spk2info_path: a ``spk2info.pt``-style file (the official ``utils/new_spk2info.pt``) and ``speaker`` its key;
            when neither is given, the model directory's own ``spk2info.pt`` is used.
        fp16: half precision flow (GPU only).
        model: an already-built ``CosyVoice3`` object (skips loading).
    """

    sampling_rate = COSYVOICE3_SAMPLING_RATE

    def __init__(
        self,
        model_dir: str | os.PathLike | None = None,
        speaker_embedding: Any = None,
        spk2info_path: str | os.PathLike | None = None,
        speaker: str = COSYVOICE3_DEFAULT_SPEAKER,
        fp16: bool = False,
        model: Any = None,
    ):
        import torch

        if model is None:
            if model_dir is None:
                raise ValueError("CosyVoice3Detokenizer needs model_dir (or a built model=...).")
            CosyVoice3 = _import_cosyvoice3()
            model = CosyVoice3(os.fspath(model_dir), load_trt=False, load_vllm=False, fp16=fp16)
        self.cosyvoice = model
        self.model = model.model  # CosyVoice3Model: flow + hift + token2wav
        self.sampling_rate = int(getattr(model, "sample_rate", COSYVOICE3_SAMPLING_RATE))
        estimator = getattr(getattr(getattr(self.model, "flow", None), "decoder", None), "estimator", None)
        if estimator is not None and hasattr(estimator, "static_chunk_size"):
            estimator.static_chunk_size = 2 * COSYVOICE3_SEGMENT_TOKENS
        if speaker_embedding is None:
            if spk2info_path is not None:
                spk2info = torch.load(os.fspath(spk2info_path), map_location="cpu")
            else:
                spk2info = getattr(getattr(model, "frontend", None), "spk2info", None) or {}
            if speaker not in spk2info:
                raise KeyError(f"speaker {speaker!r} not found in the speaker table (have {sorted(spk2info)[:10]}).")
            speaker_embedding = spk2info[speaker]["embedding"]
        embedding = torch.as_tensor(np.asarray(speaker_embedding, dtype=np.float32))
        self.speaker_embedding = embedding.reshape(1, -1)

    def __call__(self, codes: Sequence[int]) -> np.ndarray:
        import torch

        tokens = torch.tensor([[int(c) for c in codes]], dtype=torch.int32)
        if tokens.shape[1] == 0:
            return np.zeros(0, dtype=np.float32)
        tokens = tokens.clamp(0, 6560)
        session = str(uuid_lib.uuid4())
        self.model.hift_cache_dict[session] = None
        pieces = []
        try:
            segments = split_for_token2wav(tokens.shape[1])
            for index, (start, end) in enumerate(segments):
                last = index == len(segments) - 1
                stop = tokens.shape[1] if last else min(end + COSYVOICE3_PRE_LOOKAHEAD, tokens.shape[1])
                with torch.no_grad():
                    speech = self.model.token2wav(
                        token=tokens[:, :stop],
                        prompt_token=torch.zeros(1, 0, dtype=torch.int32),
                        prompt_feat=torch.zeros(1, 0, 80),
                        embedding=self.speaker_embedding,
                        token_offset=start,
                        uuid=session,
                        stream=False,
                        finalize=last,
                    )
                pieces.append(speech.detach().float().cpu().reshape(-1).numpy())
        finally:
            self.model.hift_cache_dict.pop(session, None)
        return np.concatenate(pieces).astype(np.float32) if pieces else np.zeros(0, dtype=np.float32)


def _import_cosyvoice3():
    try:
        from cosyvoice.cli.cosyvoice import CosyVoice3
    except ImportError as err:
        raise ImportError(
            "CosyVoice3Detokenizer needs the `cosyvoice` package from github.com/FunAudioLLM/CosyVoice (clone it, "
            "install its requirements and put the repository and third_party/Matcha-TTS on PYTHONPATH), plus the "
            "Fun-CosyVoice3-0.5B-2512 model files. The speech codes themselves do not need it: "
            "processor.decode_speech(...) returns them."
        ) from err
    return CosyVoice3


def save_audio(path: str | os.PathLike, waveform: Any, sampling_rate: int = COSYVOICE3_SAMPLING_RATE, format: str | None = None) -> str:
    """Write a mono (or (channels, time)) waveform to ``path`` with soundfile (wav/flac/ogg by extension)."""
    import soundfile as sf

    if hasattr(waveform, "detach"):
        waveform = waveform.detach().float().cpu().numpy()
    data = np.asarray(waveform, dtype=np.float32)
    if data.ndim == 2 and data.shape[0] < data.shape[1]:
        data = data.T  # soundfile wants (time, channels)
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    sf.write(path, data, int(sampling_rate), format=format)
    return path


__all__ = [
    "COSYVOICE3_SAMPLING_RATE",
    "CosyVoice3Detokenizer",
    "SpeechDetokenizer",
    "clean_text_ids",
    "save_audio",
    "speech_ids_to_codes",
    "split_for_token2wav",
]
