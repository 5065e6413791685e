"""The released CosyVoice 3 speakers as voice files.

Fun-Audio-Chat's ``utils/new_spk2info.pt`` (and CosyVoice's ``spk2info.pt``) is a pickled dict
``{speaker name: {tensor name: tensor}}``; the release holds ``中文女`` and ``中文男``, each with a CAM++
``embedding`` (1, 192), a prompt ``speech_token`` (1, T) and a prompt ``speech_feat`` (1, T_mel, 80). The official
``token2wav`` passes only the embedding; here every speaker becomes a voice with its full prompt, which is where
CosyVoice 3 gets most of its speaker similarity.

The ``.pt`` is read **once**, at conversion, with ``torch.load(weights_only=True)`` (tensors and plain containers
only: no code is unpickled); from then on voices are safetensors files in a ``voices/`` folder beside the converted
detokenizer. Entries written by CosyVoice's ``add_zero_shot_spk`` (``flow_embedding``,
``flow_prompt_speech_token``, ``prompt_speech_feat``) are read too. Prompt codes and mel are cut to a common length
(two frames per code), as CosyVoice's frontend cuts a fresh prompt.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

OFFICIAL_SPEAKER_FILES = ("new_spk2info.pt", "spk2info.pt")
VOICES_FOLDER = "voices"
VOICE_SUFFIX = ".safetensors"

# (what we store, the names an official entry may use for it, first found wins)
_EMBEDDING_KEYS = ("embedding", "flow_embedding", "llm_embedding")
_CODES_KEYS = ("speech_token", "flow_prompt_speech_token", "llm_prompt_speech_token")
_MEL_KEYS = ("speech_feat", "prompt_speech_feat")


def _first(entry: dict, keys: tuple[str, ...]):
    for key in keys:
        if key in entry and entry[key] is not None:
            return entry[key]
    return None


def read_official_speakers(path: str | os.PathLike, token_mel_ratio: int = 2) -> list:
    """The speakers of an official ``spk2info.pt`` as :class:`~fun_audio_chat.token2wav.CosyVoice3Voice` objects,
    in file order."""
    from ..token2wav.voice import CosyVoice3Voice, align_prompt

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no speaker file (the official new_spk2info.pt / spk2info.pt).")
    try:
        table = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle with code in it, or not a torch file at all
        reason = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{path}: not a speaker table torch can read safely (weights_only=True: tensors and plain containers "
            f"only): {reason}."
        ) from err
    if not isinstance(table, dict) or not table or not all(isinstance(entry, dict) for entry in table.values()):
        raise ValueError(
            f"{path}: expected a dict {{speaker name: {{'embedding', 'speech_token', 'speech_feat'}}}} as in "
            "CosyVoice's spk2info.pt; got something else."
        )
    voices = []
    for name, entry in table.items():
        embedding = _first(entry, _EMBEDDING_KEYS)
        if embedding is None:
            raise ValueError(
                f"{path}: speaker {name!r} has no speaker embedding (one of {_EMBEDDING_KEYS}); keys: {sorted(entry)}."
            )
        codes, mel = _first(entry, _CODES_KEYS), _first(entry, _MEL_KEYS)
        if (codes is None) != (mel is None):
            raise ValueError(
                f"{path}: speaker {name!r} has prompt {'codes' if mel is None else 'mel'} but no prompt "
                f"{'mel' if mel is None else 'codes'}; a prompt needs both."
            )
        if codes is None:
            voices.append(CosyVoice3Voice.from_speaker_embedding(str(name), embedding))
            continue
        codes = torch.as_tensor(codes).reshape(-1).long()
        mel = torch.as_tensor(mel).float()
        mel = mel[0] if mel.dim() == 3 else mel
        codes, mel = align_prompt(codes, mel, token_mel_ratio)
        voices.append(CosyVoice3Voice(str(name), embedding, codes, mel))
    return voices


def voice_file_name(name: str) -> str:
    """A file name for a voice: the name itself when it is made of letters (any script), digits, ``-``, ``_``, ``.``
    and spaces, else its UTF-8 hex (the voice keeps its real name inside the file)."""
    if re.fullmatch(r"[\w\-. ]+", name) and not name.startswith("."):
        return name + VOICE_SUFFIX
    return name.encode("utf-8").hex() + VOICE_SUFFIX


def find_official_speakers(source: str | os.PathLike) -> Path | None:
    """The speaker file of an official folder (``new_spk2info.pt`` or ``spk2info.pt``, also under ``utils/``), or
    the file itself; None when there is none."""
    source = Path(source).expanduser()
    if source.is_file():
        return source
    for folder in (source, source / "utils"):
        for name in OFFICIAL_SPEAKER_FILES:
            if (folder / name).is_file():
                return folder / name
    return None


def convert_official_speakers(source: str | os.PathLike, output_dir: str | os.PathLike, config=None) -> list[Path]:
    """Write every speaker of an official ``spk2info.pt`` (a file, or a folder holding one) as
    ``OUTPUT_DIR/voices/<name>.safetensors``; returns the files written. ``config`` (a detokenizer config) checks
    each voice against the detokenizer it will serve."""
    speaker_file = find_official_speakers(source)
    if speaker_file is None:
        raise FileNotFoundError(f"{source}: no {' or '.join(OFFICIAL_SPEAKER_FILES)} to convert.")
    voices = read_official_speakers(speaker_file)
    folder = Path(output_dir) / VOICES_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for voice in voices:
        if config is not None:
            voice.validate(config)
        path = folder / voice_file_name(voice.name)
        voice.save(path)
        written.append(path)
    return written


__all__ = [
    "OFFICIAL_SPEAKER_FILES",
    "VOICES_FOLDER",
    "convert_official_speakers",
    "find_official_speakers",
    "read_official_speakers",
    "voice_file_name",
]
