"""Native CosyVoice 3 token-to-waveform model (25 Hz speech codes → 24 kHz audio) in plain PyTorch."""

from .configuration_cosyvoice3 import CosyVoice3Config, CosyVoice3FlowConfig, CosyVoice3HiFTConfig
from .loading import CheckpointFormatError, config_from_official_yaml
from .modeling_cosyvoice3 import CosyVoice3Detokenizer, StreamingSession, split_segments
from .streaming_audio import AudioEvent, SpeechAudioStreamer
from .voice import CosyVoice3Voice, align_prompt

__all__ = [
    "AudioEvent",
    "CheckpointFormatError",
    "CosyVoice3Config",
    "CosyVoice3Detokenizer",
    "CosyVoice3FlowConfig",
    "CosyVoice3HiFTConfig",
    "CosyVoice3Voice",
    "SpeechAudioStreamer",
    "StreamingSession",
    "align_prompt",
    "config_from_official_yaml",
    "split_segments",
]
