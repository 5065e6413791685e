"""The processor files of the released checkpoint layout that ``ProcessorMixin.save_pretrained`` does not write.

transformers 5 saves a processor as ``processor_config.json``, ``chat_template.jinja`` and each tokenizer's own files.
The released ``FunAudioLLM/Fun-Audio-Chat-8B`` repository was written by the transformers 4.x the official code pins
(4.52.3) and holds more (docs/official-format.md#layout). :func:`write_release_layout` writes those files after
transformers' own save, so a folder this library saves or pushes has the release's layout, and each of them has a
reader that needs it:

``preprocessor_config.json``
    The Whisper feature extractor's settings (128 mel bins, 16 kHz, hop 160, n_fft 400). ``processor_config.json``
    keeps exactly the release's keys (``FunAudioChatProcessor.to_dict``), so this file is the feature extractor's
    only home: ``AutoProcessor.from_pretrained`` (ours, and the official code's 4.x one) and
    ``WhisperFeatureExtractor.from_pretrained`` read it.

``special_tokens_map.json`` and ``speech_tokenizer/special_tokens_map.json``
    The special tokens of each tokenizer by name, in the 4.x format the release ships (bos/eos/unk/pad as token
    dicts, ``additional_special_tokens``, and the model-specific names ``audio_token`` … ``text_sil_token`` of the
    text tokenizer). transformers 5 neither writes nor needs it (its ``tokenizer_config.json`` names the same
    tokens); the official code's transformers 4.x reads a tokenizer's special tokens from it whenever
    ``tokenizer_config.json`` has no ``added_tokens_decoder``, which is the case for every config transformers 5
    writes for its tokenizers-backed classes (the Qwen tokenizer, the speech tokenizer).

``vocab.json`` and ``merges.txt``
    The byte-level BPE vocabulary and merges of the Qwen text tokenizer, beside ``tokenizer.json`` as in the release:
    what a BPE tokenizer is built from by a loader that does not read ``tokenizer.json``
    (``Qwen2Tokenizer.from_pretrained`` on a folder without it, the slow 4.x tokenizer, converters that read the
    vocabulary directly). Skipped for a text tokenizer whose model is not BPE.

``speech_tokenizer/tokenizer_config.json`` naming ``PreTrainedTokenizerFast``
    transformers 5 names the speech tokenizer's class ``TokenizersBackend``, a class 4.x does not have, so
    ``AutoTokenizer`` there could not load the subfolder. The release names ``PreTrainedTokenizerFast``, which both
    major versions resolve to the same tokenizer.
"""

from __future__ import annotations

import json
import os
from typing import Any

# transformers saves a processor's second tokenizer in a subfolder named after its attribute, as the release has it.
SPEECH_TOKENIZER_SUBFOLDER = "speech_tokenizer"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
# The class the release names for the speech tokenizer, and the name transformers 5 writes instead.
RELEASE_SPEECH_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
_TRANSFORMERS_5_SPEECH_TOKENIZER_CLASS = "TokenizersBackend"
# The model-specific special tokens the release's text special_tokens_map.json names (tokenizer.audio_token …).
_MODEL_SPECIFIC_TOKEN_NAMES = ("audio_token", "audio_bos_token", "audio_eos_token", "audio_pad_token", "text_sil_token")


def write_release_layout(processor, save_directory: str | os.PathLike) -> list[str]:
    """Write the release-layout files of the module docstring into ``save_directory``, where
    ``ProcessorMixin.save_pretrained`` has just saved ``processor``. Returns the paths written."""
    save_directory = os.fspath(save_directory)
    speech_directory = os.path.join(save_directory, SPEECH_TOKENIZER_SUBFOLDER)
    written = list(processor.feature_extractor.save_pretrained(save_directory))
    written.append(write_special_tokens_map(processor.tokenizer, save_directory))
    written.append(write_special_tokens_map(processor.speech_tokenizer, speech_directory))
    written.extend(write_bpe_vocabulary(processor.tokenizer, save_directory))
    name_speech_tokenizer_class(speech_directory)
    return written


def write_special_tokens_map(tokenizer, directory: str) -> str:
    """Write the 4.x-format ``special_tokens_map.json`` of ``tokenizer`` into ``directory``; returns its path."""
    data: dict[str, Any] = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            data[name] = {
                "content": str(value),
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
            }
    extra = [str(token) for token in getattr(tokenizer, "extra_special_tokens", []) or []]
    model_specific = {}
    for key in _MODEL_SPECIFIC_TOKEN_NAMES:
        value = getattr(tokenizer, key, None)
        if isinstance(value, str):
            model_specific[key] = value
            if value not in extra:
                extra.append(value)
    if extra:
        data["additional_special_tokens"] = extra
    data.update(model_specific)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, SPECIAL_TOKENS_MAP_FILE)
    _write_json(path, data)
    return path


def write_bpe_vocabulary(tokenizer, directory: str) -> list[str]:
    """Write ``vocab.json`` and ``merges.txt`` of a byte-level BPE tokenizer into ``directory``; returns their paths
    (none for a tokenizer whose model is not BPE)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = getattr(backend, "model", None)
    if model is None or type(model).__name__ != "BPE":
        return []
    return list(model.save(directory))


def name_speech_tokenizer_class(speech_directory: str) -> None:
    """Rename the speech tokenizer's class in its ``tokenizer_config.json`` from transformers 5's
    ``TokenizersBackend`` to the release's ``PreTrainedTokenizerFast`` (any other name is left as it is)."""
    path = os.path.join(speech_directory, "tokenizer_config.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    if config.get("tokenizer_class") == _TRANSFORMERS_5_SPEECH_TOKENIZER_CLASS:
        config["tokenizer_class"] = RELEASE_SPEECH_TOKENIZER_CLASS
        _write_json(path, config)


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


__all__ = ["SPEECH_TOKENIZER_SUBFOLDER", "write_release_layout"]
