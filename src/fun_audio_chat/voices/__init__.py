"""Voices of the CosyVoice 3 detokenizer: clone one from a clip, convert the released speakers, choose by name.

* :class:`VoiceCloner` — a 3-30 s clip → a :class:`~fun_audio_chat.token2wav.CosyVoice3Voice` (S3 prompt codes,
  CosyVoice 3 prompt mel, CAM++ speaker embedding); :func:`tiny_voice_cloner` is the offline tiny one.
* :func:`convert_official_speakers` — the official ``new_spk2info.pt`` → ``voices/<name>.safetensors``.
* :class:`VoiceRegistry` — named voices for a server or a chat; unknown names are an error listing the known ones.
* :func:`prompt_mel` / :func:`speaker_fbank` — the two features, as CosyVoice 3's frontend computes them.

Cloning needs the optional ``voice-cloning`` extra (onnxruntime, kaldi-native-fbank) and the S3 tokenizer
(``speech-tokenizer`` extra); loading, saving and choosing voices need neither.
"""

from .cloning import MAX_CLIP_SECONDS, MIN_CLIP_SECONDS, VoiceCloner, VoiceCloningError
from .features import COSYVOICE3_MEL, MelSettings, prompt_mel, speaker_fbank
from .loading import load_voice_cloner
from .official import VOICES_FOLDER, convert_official_speakers, find_official_speakers, read_official_speakers
from .registry import DEFAULT_VOICE, UnknownVoiceError, VoiceRegistry, choose_voice, load_voice_file
from .speaker_encoder import OnnxSpeakerEncoder, tiny_speaker_encoder_model
from .tiny import tiny_voice_cloner

__all__ = [
    "COSYVOICE3_MEL",
    "DEFAULT_VOICE",
    "MAX_CLIP_SECONDS",
    "MIN_CLIP_SECONDS",
    "VOICES_FOLDER",
    "MelSettings",
    "OnnxSpeakerEncoder",
    "UnknownVoiceError",
    "VoiceCloner",
    "VoiceCloningError",
    "VoiceRegistry",
    "choose_voice",
    "convert_official_speakers",
    "find_official_speakers",
    "load_voice_cloner",
    "load_voice_file",
    "prompt_mel",
    "read_official_speakers",
    "speaker_fbank",
    "tiny_speaker_encoder_model",
    "tiny_voice_cloner",
]
