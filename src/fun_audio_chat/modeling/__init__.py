from .continuous_batching import ContinuousBatchDecoder, RowStep
from .generation_fun_audio_chat import SPEECH_GENERATION_DEFAULTS, FunAudioChatGenerateOutput
from .modeling_fun_audio_chat import (
    FunAudioChatForConditionalGeneration,
    FunAudioChatOutputWithPast,
    FunAudioChatPreTrainedModel,
)
from .streamers import EndEvent, FunAudioChatIteratorStreamer, GenerationFailedError, SpeechEvent, TextEvent

__all__ = [
    "ContinuousBatchDecoder",
    "SPEECH_GENERATION_DEFAULTS",
    "EndEvent",
    "FunAudioChatForConditionalGeneration",
    "FunAudioChatGenerateOutput",
    "FunAudioChatIteratorStreamer",
    "FunAudioChatOutputWithPast",
    "FunAudioChatPreTrainedModel",
    "GenerationFailedError",
    "RowStep",
    "SpeechEvent",
    "TextEvent",
]
