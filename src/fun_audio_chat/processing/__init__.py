"""Processing for Fun-Audio-Chat: audio input, the processor and chat template, speech tokens, training batches,
decoding and tool calling.

Importing this package registers :class:`FunAudioChatProcessor` with ``AutoProcessor`` (for the
``funaudiochat`` config), so ``AutoProcessor.from_pretrained(<official repo dir>)`` works.
"""

from transformers import AutoProcessor

from ..configuration_fun_audio_chat import FunAudioChatConfig
from .audio_io import (
    EXAMPLE_AUDIO_TEXT,
    TARGET_SAMPLING_RATE,
    AudioInputError,
    AudioLoadingPolicy,
    example_audio_path,
    load_audio,
    resample,
)
from .builders import (
    add_audio_special_tokens,
    build_feature_extractor,
    build_processor,
    build_speech_tokenizer,
)
from .chat_template import CHAT_TEMPLATE
from .collator import FunAudioChatDataCollator
from .detokenizer import (
    SpeechDetokenizer,
    clean_text_ids,
    save_audio,
    speech_ids_to_codes,
)
from .processing_fun_audio_chat import DEFAULT_MAX_AUDIO_SECONDS, FunAudioChatProcessor
from .prompts import (
    AUDIO_TEMPLATE,
    DEFAULT_S2M_PROMPT,
    DEFAULT_S2T_PROMPT,
    SPEECH_DELAY_TOKENS,
    SPOKEN_S2M_PROMPT,
)
from .speech_tokenizer import S3SpeechTokenizer, import_s3tokenizer
from .tool_calling import StreamingToolCallParser, ToolCallParseError, parse_tool_calls
from .training_examples import build_training_example

AutoProcessor.register(FunAudioChatConfig, FunAudioChatProcessor, exist_ok=True)

__all__ = [
    "AUDIO_TEMPLATE",
    "CHAT_TEMPLATE",
    "DEFAULT_MAX_AUDIO_SECONDS",
    "DEFAULT_S2M_PROMPT",
    "DEFAULT_S2T_PROMPT",
    "EXAMPLE_AUDIO_TEXT",
    "SPEECH_DELAY_TOKENS",
    "SPOKEN_S2M_PROMPT",
    "TARGET_SAMPLING_RATE",
    "AudioInputError",
    "AudioLoadingPolicy",
    "FunAudioChatDataCollator",
    "FunAudioChatProcessor",
    "S3SpeechTokenizer",
    "SpeechDetokenizer",
    "StreamingToolCallParser",
    "ToolCallParseError",
    "add_audio_special_tokens",
    "build_feature_extractor",
    "build_processor",
    "build_speech_tokenizer",
    "build_training_example",
    "clean_text_ids",
    "example_audio_path",
    "import_s3tokenizer",
    "load_audio",
    "parse_tool_calls",
    "resample",
    "save_audio",
    "speech_ids_to_codes",
]
