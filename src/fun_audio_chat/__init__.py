"""fun_audio_chat: Hugging Face-native Fun-Audio-Chat (speech in; text and 25 Hz speech tokens out).

The package registers the configs with ``AutoConfig``, the model with ``AutoModelForMultimodalLM`` (its Auto class)
and with ``AutoModelForSeq2SeqLM`` (kept only because the released model card loads it that way; the model is not
an encoder-decoder), the processor with ``AutoProcessor`` and the CosyVoice 3 detokenizer with ``AutoModel``, so
after ``import fun_audio_chat`` the Auto classes load Fun-Audio-Chat checkpoints.

Importing the package itself is light: torch and transformers load when first needed, so the ``fun-audio-chat``
command answers ``--help`` and argument errors at once. The classes below load on first access; the registration
runs then, or as soon as transformers is imported (right away if it already is), whichever comes first.

Why an import hook rather than plain registration here (docs/architecture.md#auto-class-registration): registering
needs transformers' Auto classes, and touching ``transformers.AutoConfig`` imports torch (measured on transformers
5.23 and 5.25; ``tests/test_auto_registration.py`` fails once it no longer does, and then this becomes a plain call).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

from . import _lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "configuration_fun_audio_chat": ("FunAudioChatAudioEncoderConfig", "FunAudioChatConfig"),
    "modeling": (
        "EndEvent",
        "FunAudioChatForConditionalGeneration",
        "FunAudioChatGenerateOutput",
        "FunAudioChatIteratorStreamer",
        "FunAudioChatOutputWithPast",
        "FunAudioChatPreTrainedModel",
        "GenerationFailedError",
        "SpeechEvent",
        "TextEvent",
    ),
    "modeling.context_length": ("ContextFit",),
    "processing": ("FunAudioChatDataCollator", "FunAudioChatProcessor"),
    "speech_codes": ("SpeechCodeFilter", "SpeechCodeLayout", "real_speech_codes"),
    "tiny": ("tiny_processor",),
    "token2wav": ("CosyVoice3Detokenizer",),
    "voice_chat": (
        "AudioPiece",
        "SpeechPiece",
        "SpokenTurn",
        "SpokenTurnMetrics",
        "SpokenTurnResult",
        "TextPiece",
        "TurnEnd",
        "VoiceChat",
    ),
}
_registration = {"done": False, "running": False}


def register_auto_classes() -> None:
    """Register the Fun-Audio-Chat classes with transformers' Auto classes (idempotent; imports torch)."""
    if _registration["done"] or _registration["running"]:
        return
    _registration["running"] = True
    try:
        from transformers import AutoConfig, AutoModelForMultimodalLM, AutoModelForSeq2SeqLM

        from .configuration_fun_audio_chat import FunAudioChatAudioEncoderConfig, FunAudioChatConfig
        from .modeling import FunAudioChatForConditionalGeneration

        importlib.import_module(".processing", __name__)  # registers the processor with AutoProcessor

        AutoConfig.register(FunAudioChatConfig.model_type, FunAudioChatConfig, exist_ok=True)
        AutoConfig.register(FunAudioChatAudioEncoderConfig.model_type, FunAudioChatAudioEncoderConfig, exist_ok=True)
        AutoModelForMultimodalLM.register(FunAudioChatConfig, FunAudioChatForConditionalGeneration, exist_ok=True)
        # only the released model card's entry point (`AutoModelForSeq2SeqLM.from_pretrained(...)`)
        AutoModelForSeq2SeqLM.register(FunAudioChatConfig, FunAudioChatForConditionalGeneration, exist_ok=True)
        # the CosyVoice 3 detokenizer (speech codes → 24 kHz audio) loads with AutoConfig / AutoModel too
        from transformers import AutoModel

        from .token2wav import CosyVoice3Config, CosyVoice3Detokenizer, CosyVoice3FlowConfig, CosyVoice3HiFTConfig

        for config_class in (CosyVoice3Config, CosyVoice3FlowConfig, CosyVoice3HiFTConfig):
            AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(CosyVoice3Config, CosyVoice3Detokenizer, exist_ok=True)
        _registration["done"] = True
    finally:
        _registration["running"] = False


class _RegisterOnTransformersImport(importlib.abc.MetaPathFinder):
    """Runs :func:`register_auto_classes` once transformers is imported, so that ``import fun_audio_chat`` followed
    by ``AutoModel...from_pretrained`` works without importing torch up front.

    What it buys over plain registration: ``import fun_audio_chat`` stays free of torch and transformers (a plain
    ``AutoConfig.register`` call here would import both, several seconds, on every ``fun-audio-chat --help``), and
    the Auto classes still know Fun-Audio-Chat whichever of ``transformers`` and ``fun_audio_chat`` is imported
    first. It wraps the execution of ``transformers`` and of this package's submodules, counting how many are
    running: registration needs our modules whole, so when one of them is what imports transformers, it waits until
    the outermost of them has finished. It removes itself after registering; a failure never breaks the user's
    ``import transformers`` (a warning names :func:`register_auto_classes` to see the error)."""

    def __init__(self):
        self.depth = 0
        self.resolving = False

    def find_spec(self, fullname, path=None, target=None):
        if self.resolving or not (fullname == "transformers" or fullname.startswith(__name__ + ".")):
            return None
        self.resolving = True
        try:
            spec = None
            for finder in sys.meta_path:
                find = getattr(finder, "find_spec", None)
                if finder is not self and find is not None:
                    spec = find(fullname, path, target)
                    if spec is not None:
                        break
        finally:
            self.resolving = False
        if spec is None or not isinstance(
            spec.loader, (importlib.machinery.SourceFileLoader, importlib.machinery.SourcelessFileLoader)
        ):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            self.depth += 1
            try:
                exec_module(module)
            finally:
                self.depth -= 1
            if self.depth == 0 and "transformers" in sys.modules:
                self.register()

        spec.loader.exec_module = exec_then_register
        return spec

    def register(self):
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        try:
            register_auto_classes()
        except Exception as err:  # never break the user's `import transformers`
            warnings.warn(
                f"fun_audio_chat could not register its classes with transformers' Auto classes ({err!r}); "
                "call fun_audio_chat.register_auto_classes() to see the error.",
                stacklevel=2,
            )


if "transformers" in sys.modules:
    register_auto_classes()
elif not any(isinstance(finder, _RegisterOnTransformersImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterOnTransformersImport())


# the classes load on first access, after the Auto classes know them (see the module docstring)
__getattr__, __dir__, __all__ = _lazy_exports.lazy_exports(__name__, _EXPORTS, before_import=register_auto_classes)
