"""``CosyVoice3Voice``: who the CosyVoice 3 detokenizer speaks as.

A voice is a CAM++ speaker embedding plus, optionally, a prompt: the S3 speech codes of a short clip of that
speaker and the clip's 80-bin mel at the flow's frame rate (24 kHz audio, 50 frames per second). CosyVoice 3 gets
most of its speaker similarity from the prompt: the flow runs over ``prompt codes + reply codes`` with the prompt
mel as the known start of the output (zero-shot cloning), the embedding only adds a global colour. A voice without
a prompt (embedding only) is what the official Fun-Audio-Chat ``token2wav`` does.

Voices are stored as safetensors (three tensors, the name in the metadata): nothing is unpickled when one loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

VOICE_FORMAT = "fun_audio_chat.cosyvoice3_voice"
VOICE_FORMAT_VERSION = "1"


def align_prompt(prompt_codes, prompt_mel, token_mel_ratio: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a prompt's codes (T,) and mel (T_mel, mel_bins) to a common length, as CosyVoice's own frontend does for
    its 24 kHz models: ``n = min(T_mel // ratio, T)`` codes and ``ratio · n`` mel frames (a clip's tokenizer and
    mel extractor round its length differently, so they rarely agree to the frame)."""
    codes = torch.as_tensor(prompt_codes).reshape(-1)
    mel = torch.as_tensor(prompt_mel)
    if mel.dim() != 2:
        raise ValueError(f"prompt_mel must be (frames, mel_bins); got shape {tuple(mel.shape)}.")
    count = min(mel.shape[0] // token_mel_ratio, codes.shape[0])
    return codes[:count], mel[: count * token_mel_ratio]


@dataclass(eq=False)
class CosyVoice3Voice:
    """A named CosyVoice 3 voice: ``speaker_embedding`` (192,) float32, ``prompt_codes`` (T,) int64 and
    ``prompt_mel`` (token_mel_ratio·T, 80) float32. ``T = 0`` (the default) is a voice without a prompt.

    Build one with the constructor (tensors, arrays or lists are accepted and converted), with
    :meth:`from_speaker_embedding`, or load one with :meth:`load`. :meth:`validate` checks it against a detokenizer
    config; the detokenizer calls it on every voice it is given.
    """

    name: str
    speaker_embedding: torch.Tensor
    prompt_codes: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    prompt_mel: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 80))

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a voice needs a non-empty name (str); got {self.name!r}.")
        embedding = torch.as_tensor(self.speaker_embedding)
        if embedding.is_complex() or not (embedding.is_floating_point() or embedding.dtype in _INTEGER_DTYPES):
            raise ValueError(f"voice {self.name!r}: speaker_embedding must be real numbers, got {embedding.dtype}.")
        if embedding.dim() == 2 and embedding.shape[0] == 1:  # the official (1, 192) layout
            embedding = embedding[0]
        if embedding.dim() != 1:
            raise ValueError(
                f"voice {self.name!r}: speaker_embedding must be one vector (192,) or (1, 192); "
                f"got shape {tuple(embedding.shape)}."
            )
        codes = torch.as_tensor(self.prompt_codes)
        if codes.dim() == 2 and codes.shape[0] == 1:  # the official (1, T) layout
            codes = codes[0]
        if codes.dim() != 1:
            raise ValueError(
                f"voice {self.name!r}: prompt_codes must be 1-D (T,) or (1, T); got shape {tuple(codes.shape)}."
            )
        if codes.numel() and (codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool):
            raise ValueError(f"voice {self.name!r}: prompt_codes must be integer speech codes, got {codes.dtype}.")
        mel = torch.as_tensor(self.prompt_mel)
        if mel.dim() == 3 and mel.shape[0] == 1:  # the official (1, T_mel, 80) layout
            mel = mel[0]
        if mel.dim() != 2:
            raise ValueError(
                f"voice {self.name!r}: prompt_mel must be (frames, mel_bins) or (1, frames, mel_bins); "
                f"got shape {tuple(mel.shape)}."
            )
        self.speaker_embedding = embedding.detach().to(torch.float32).cpu().contiguous()
        self.prompt_codes = codes.detach().to(torch.long).cpu().contiguous()
        self.prompt_mel = mel.detach().to(torch.float32).cpu().contiguous()
        if not torch.isfinite(self.speaker_embedding).all() or not torch.isfinite(self.prompt_mel).all():
            raise ValueError(f"voice {self.name!r}: speaker_embedding and prompt_mel must be finite (no NaN or inf).")

    # -- construction -----------------------------------------------------------------------------------------
    @classmethod
    def from_speaker_embedding(cls, name: str, speaker_embedding) -> CosyVoice3Voice:
        """A voice without a prompt: only the CAM++ embedding conditions the flow (the official default)."""
        return cls(name=name, speaker_embedding=speaker_embedding)

    # -- properties -------------------------------------------------------------------------------------------
    @property
    def prompt_tokens(self) -> int:
        return int(self.prompt_codes.shape[0])

    @property
    def has_prompt(self) -> bool:
        return self.prompt_tokens > 0

    def __repr__(self) -> str:
        return (
            f"CosyVoice3Voice(name={self.name!r}, prompt_tokens={self.prompt_tokens}, "
            f"prompt_frames={self.prompt_mel.shape[0]})"
        )

    # -- checks -----------------------------------------------------------------------------------------------
    def validate(self, config) -> CosyVoice3Voice:
        """Check the voice against a detokenizer config (:class:`CosyVoice3Config` or its ``flow`` part); raises
        ``ValueError`` naming the problem and the fix. Returns the voice."""
        flow = getattr(config, "flow", config)
        dim, vocab, ratio, bins = flow.speaker_embedding_dim, flow.vocab_size, flow.token_mel_ratio, flow.mel_bins
        if self.speaker_embedding.shape[0] != dim:
            raise ValueError(
                f"voice {self.name!r}: speaker_embedding has {self.speaker_embedding.shape[0]} values; this "
                f"detokenizer takes a {dim}-value CAM++ embedding (the speaker encoder CosyVoice 3 ships)."
            )
        codes = self.prompt_codes
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= vocab):
            bad = codes[(codes < 0) | (codes >= vocab)][:5].tolist()
            raise ValueError(
                f"voice {self.name!r}: prompt codes must be speech codes in [0, {vocab}); got {bad}. Strip the "
                "LLM's BOS/EOS/pad ids, or re-tokenize the prompt clip with the S3 v3 tokenizer."
            )
        mel = self.prompt_mel
        if mel.shape[0] and mel.shape[1] != bins:
            raise ValueError(
                f"voice {self.name!r}: prompt_mel has {mel.shape[1]} mel bins per frame; this detokenizer uses "
                f"{bins} (layout (frames, {bins}), not ({bins}, frames))."
            )
        segment_frames = ratio * getattr(config, "segment_tokens", 750)
        if ratio * codes.shape[0] + segment_frames > flow.max_frames:
            seconds = codes.shape[0] * ratio / 50
            raise ValueError(
                f"voice {self.name!r}: its {seconds:.0f} s prompt leaves too little of the flow's "
                f"{flow.max_frames // 50} s noise table for a reply; use a prompt clip of at most 30 s."
            )
        if mel.shape[0] != ratio * codes.shape[0]:
            raise ValueError(
                f"voice {self.name!r}: {codes.shape[0]} prompt codes need {ratio * codes.shape[0]} prompt mel "
                f"frames ({ratio} per code); got {mel.shape[0]}. Cut both to a common length with "
                "fun_audio_chat.token2wav.align_prompt(codes, mel), as CosyVoice's frontend does."
            )
        return self

    # -- files ------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the voice as safetensors (tensors ``speaker_embedding``, ``prompt_codes``, ``prompt_mel``; the
        name and format in the metadata)."""
        from safetensors.torch import save_file

        tensors = {
            "speaker_embedding": self.speaker_embedding,
            "prompt_codes": self.prompt_codes,
            "prompt_mel": self.prompt_mel,
        }
        metadata = {"format": VOICE_FORMAT, "format_version": VOICE_FORMAT_VERSION, "name": self.name}
        save_file(tensors, os.fspath(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CosyVoice3Voice:
        """Read a voice written by :meth:`save` (safetensors only: nothing is unpickled)."""
        from safetensors import SafetensorError, safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no voice file at {path}.")
        try:
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except SafetensorError as error:
            raise ValueError(
                f"{path} is not a voice file (safetensors could not read it: {error}). Voice files are written by "
                "CosyVoice3Voice.save; clone a voice from a clip or convert the official speakers first."
            ) from error
        if metadata.get("format") != VOICE_FORMAT:
            raise ValueError(
                f"{path} is a safetensors file but not a voice (metadata format {metadata.get('format')!r}, "
                f"expected {VOICE_FORMAT!r}); write voices with CosyVoice3Voice.save."
            )
        missing = {"speaker_embedding", "prompt_codes", "prompt_mel"} - set(tensors)
        if missing:
            raise ValueError(f"voice file {path} lacks the tensors {sorted(missing)}; re-save the voice.")
        name = metadata.get("name") or os.path.splitext(os.path.basename(path))[0]
        return cls(
            name=name,
            speaker_embedding=tensors["speaker_embedding"],
            prompt_codes=tensors["prompt_codes"],
            prompt_mel=tensors["prompt_mel"],
        )


_INTEGER_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)

__all__ = ["CosyVoice3Voice", "align_prompt"]
