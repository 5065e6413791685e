"""fun_audio_chat: Hugging Face-native Fun-Audio-Chat (speech in; text and 25 Hz speech tokens out)."""

from transformers import AutoConfig

from .configuration_fun_audio_chat import FunAudioChatAudioEncoderConfig, FunAudioChatConfig

AutoConfig.register(FunAudioChatConfig.model_type, FunAudioChatConfig, exist_ok=True)
AutoConfig.register(FunAudioChatAudioEncoderConfig.model_type, FunAudioChatAudioEncoderConfig, exist_ok=True)

__all__ = ["FunAudioChatAudioEncoderConfig", "FunAudioChatConfig"]
__version__ = "0.1.0"
