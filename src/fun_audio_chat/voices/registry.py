"""The voices a server (or a chat) can speak in, by name.

A :class:`VoiceRegistry` holds named :class:`~fun_audio_chat.token2wav.CosyVoice3Voice` objects checked against
the detokenizer they are for, plus ``default``: the detokenizer's own speaker (its stored embedding, no prompt; what
the official Fun-Audio-Chat uses). :meth:`VoiceRegistry.resolve` maps a requested name to the voice object to pass
as ``voice=`` (None for the default) or raises :class:`UnknownVoiceError`, whose message lists the voices there are.

OpenAI's own voice names (``alloy``, ``marin`` ...) select the default voice unless a voice of that name is
registered, so that clients written for OpenAI's API work unchanged.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .official import VOICE_SUFFIX, VOICES_FOLDER

DEFAULT_VOICE = "default"
OPENAI_VOICE_NAMES = frozenset(
    {"alloy", "ash", "ballad", "cedar", "coral", "echo", "fable", "marin", "nova", "onyx", "sage", "shimmer", "verse"}
)


class UnknownVoiceError(ValueError):
    """A voice name that is not registered; ``available`` lists those that are."""

    def __init__(self, name: str, available: list[str]):
        self.name, self.available = name, list(available)
        super().__init__(f"unknown voice {name!r}; available voices: {', '.join(self.available)}.")


def load_voice_file(path: str | os.PathLike, name: str | None = None):
    """A voice file (safetensors written by ``CosyVoice3Voice.save``), renamed to ``name`` when given."""
    from ..token2wav.voice import CosyVoice3Voice

    voice = CosyVoice3Voice.load(Path(path).expanduser())
    return dataclasses.replace(voice, name=name) if name and name != voice.name else voice


def is_voice_file(path: str | os.PathLike) -> bool:
    return os.fspath(path).endswith(VOICE_SUFFIX)


class VoiceRegistry:
    """Named voices for one detokenizer.

    Args:
        voices: voices to register (their own names).
        config: the detokenizer's config; every voice added is checked against it (embedding size, code
            vocabulary, mel bins, prompt alignment) so a bad voice fails when registered, not mid-reply.
    """

    def __init__(self, voices=(), config=None):
        self.config = config
        self._voices: dict = {}
        for voice in voices:
            self.add(voice)

    # ------------------------------------------------------------------------------------------------ building
    def add(self, voice, name: str | None = None):
        """Register ``voice`` (under ``name`` if given); returns the registered voice. ``default`` is reserved."""
        if name and name != voice.name:
            voice = dataclasses.replace(voice, name=name)
        if voice.name == DEFAULT_VOICE:
            raise ValueError(
                f"the voice name {DEFAULT_VOICE!r} is reserved for the detokenizer's own speaker; pick another name."
            )
        if self.config is not None:
            voice.validate(self.config)
        self._voices[voice.name] = voice
        return voice

    def add_folder(self, folder: str | os.PathLike) -> list[str]:
        """Register the voices of a detokenizer folder: its voice files (``folder/voices/*.safetensors``, the layout
        ``convert-detokenizer`` writes; ``folder`` may be that ``voices/`` itself), else the speakers of an official
        folder's ``spk2info.pt``. Returns the names added (none when there are none)."""
        from .official import find_official_speakers, read_official_speakers

        folder = Path(folder).expanduser()
        if not folder.is_dir():
            return []
        # a model folder's other safetensors (weights, noise tables) are not voices: only a voices/ folder is read
        voice_folder = folder if folder.name == VOICES_FOLDER else folder / VOICES_FOLDER
        files = sorted(voice_folder.glob("*" + VOICE_SUFFIX)) if voice_folder.is_dir() else []
        if files:
            return [self.add(load_voice_file(path)).name for path in files]
        speaker_file = find_official_speakers(folder)
        if speaker_file is None:
            return []
        return [self.add(voice).name for voice in read_official_speakers(speaker_file)]

    def add_spec(self, spec: str, cloner=None):
        """Register ``NAME=CLIP_OR_VOICE_FILE`` (what ``serve --voice`` takes): a ``.safetensors`` voice file is
        loaded, anything else is an audio clip cloned with ``cloner`` (a :class:`~.cloning.VoiceCloner`, or a
        callable returning one, called only when a clip needs it)."""
        name, separator, source = spec.partition("=")
        name, source = name.strip(), source.strip()
        if not separator or not name or not source:
            raise ValueError(
                f"voice {spec!r}: expected NAME=CLIP_OR_VOICE_FILE, e.g. anna=anna.wav or anna=anna.safetensors."
            )
        if not Path(source).expanduser().exists():
            raise FileNotFoundError(f"voice {name}: {source} not found (an audio clip or a .safetensors voice file).")
        if is_voice_file(source):
            return self.add(load_voice_file(source), name=name)
        if cloner is None:
            raise ValueError(f"voice {name}: {source} is a clip, and no voice cloner is available to clone it.")
        if not hasattr(cloner, "clone"):
            cloner = cloner()
        return self.add(cloner.clone(Path(source).expanduser(), name=name))

    # ------------------------------------------------------------------------------------------------ lookup
    @property
    def names(self) -> list[str]:
        """``default`` first, then the registered voices in the order they were added."""
        return [DEFAULT_VOICE, *self._voices]

    def __contains__(self, name: object) -> bool:
        return name == DEFAULT_VOICE or name in self._voices or name in OPENAI_VOICE_NAMES

    def __len__(self) -> int:
        return len(self._voices)

    def get(self, name: str):
        """The registered voice called ``name`` (KeyError-free: unknown names raise :class:`UnknownVoiceError`)."""
        if name not in self._voices:
            raise UnknownVoiceError(name, self.names)
        return self._voices[name]

    def resolve(self, name: str | None):
        """The voice object to pass as ``voice=`` for a requested name: None for ``default`` (and for no name, or an
        OpenAI voice name that is not registered), the registered voice otherwise. Unknown names raise
        :class:`UnknownVoiceError`."""
        if name is None or name == "" or name == DEFAULT_VOICE:
            return None
        if name in self._voices:
            return self._voices[name]
        if name in OPENAI_VOICE_NAMES:
            return None
        raise UnknownVoiceError(name, self.names)

    def __repr__(self) -> str:
        return f"VoiceRegistry({self.names})"


def choose_voice(choice: str | None, config=None, folder: str | os.PathLike | None = None):
    """The voice object for a user's ``--voice``: a ``.safetensors`` voice file, or the name of a voice in the
    detokenizer folder's ``voices/``, or ``default``/None (the detokenizer's own speaker, returned as None)."""
    if choice is None:
        return None
    if is_voice_file(choice):
        if not Path(choice).expanduser().is_file():
            raise FileNotFoundError(f"voice file {choice} not found.")
        voice = load_voice_file(choice)
        return voice.validate(config) if config is not None else voice
    if Path(choice).expanduser().is_file():
        raise ValueError(
            f"{choice} is not a voice file (.safetensors); if it is a recording, clone it first: "
            f"fun-audio-chat clone-voice {choice} VOICE.safetensors"
        )
    registry = VoiceRegistry(config=config)
    if folder is not None:
        registry.add_folder(folder)
    return registry.resolve(choice)


__all__ = [
    "DEFAULT_VOICE",
    "OPENAI_VOICE_NAMES",
    "UnknownVoiceError",
    "VoiceRegistry",
    "choose_voice",
    "is_voice_file",
    "load_voice_file",
]
