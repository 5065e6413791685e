"""fun_audio_chat: Hugging Face-native Fun-Audio-Chat (speech in; text and 25 Hz speech tokens out).

Importing the package registers the configs with ``AutoConfig``, the model with ``AutoModelForSeq2SeqLM`` (what
the official model card uses) and ``AutoModelForMultimodalLM``, and the processor with ``AutoProcessor``.
"""

from transformers import AutoConfig, AutoModelForMultimodalLM, AutoModelForSeq2SeqLM

from .configuration_fun_audio_chat import FunAudioChatAudioEncoderConfig, FunAudioChatConfig
from .modeling import (
    EndEvent,
    FunAudioChatForConditionalGeneration,
    FunAudioChatGenerateOutput,
    FunAudioChatIteratorStreamer,
    FunAudioChatOutputWithPast,
    FunAudioChatPreTrainedModel,
    SpeechEvent,
    TextEvent,
)
from .processing import FunAudioChatDataCollator, FunAudioChatProcessor, tiny_processor
from .token2wav import CosyVoice3Detokenizer

AutoConfig.register(FunAudioChatConfig.model_type, FunAudioChatConfig, exist_ok=True)
AutoConfig.register(FunAudioChatAudioEncoderConfig.model_type, FunAudioChatAudioEncoderConfig, exist_ok=True)
AutoModelForSeq2SeqLM.register(FunAudioChatConfig, FunAudioChatForConditionalGeneration, exist_ok=True)
AutoModelForMultimodalLM.register(FunAudioChatConfig, FunAudioChatForConditionalGeneration, exist_ok=True)

__all__ = [
    "CosyVoice3Detokenizer",
    "EndEvent",
    "FunAudioChatAudioEncoderConfig",
    "FunAudioChatConfig",
    "FunAudioChatDataCollator",
    "FunAudioChatForConditionalGeneration",
    "FunAudioChatGenerateOutput",
    "FunAudioChatIteratorStreamer",
    "FunAudioChatOutputWithPast",
    "FunAudioChatPreTrainedModel",
    "FunAudioChatProcessor",
    "SpeechEvent",
    "TextEvent",
    "tiny_processor",
]
__version__ = "0.1.0"
