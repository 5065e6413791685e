from .modeling_fun_audio_chat import (
    FunAudioChatForConditionalGeneration,
    FunAudioChatOutputWithPast,
    FunAudioChatPreTrainedModel,
)

__all__ = ["FunAudioChatForConditionalGeneration", "FunAudioChatOutputWithPast", "FunAudioChatPreTrainedModel"]
