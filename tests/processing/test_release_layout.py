"""The release-layout files (fun_audio_chat.processing.release_layout): each is written, transformers' own save does
not write it, and its reader gets from it what the module docstring says it needs."""

from __future__ import annotations

import json
import os

import pytest
from transformers import AutoProcessor, AutoTokenizer, ProcessorMixin, WhisperFeatureExtractor

import fun_audio_chat  # noqa: F401  (registers the processor with AutoProcessor)
from fun_audio_chat.processing.release_layout import write_release_layout

from .conftest import PROCESSOR_FIXTURE

RELEASE_LAYOUT_FILES = {
    "preprocessor_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "speech_tokenizer/special_tokens_map.json",
}


def _files(folder) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def _json(path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture
def transformers_save(processor, tmp_path):
    """The folder as transformers' own ProcessorMixin.save_pretrained leaves it, before the release-layout files."""
    folder = tmp_path / "saved"
    ProcessorMixin.save_pretrained(processor, str(folder))
    return folder


@pytest.fixture
def release_save(processor, transformers_save):
    written = write_release_layout(processor, transformers_save)
    return transformers_save, written


def test_transformers_save_lacks_the_release_files_and_write_release_layout_adds_them(transformers_save, processor):
    """What the module exists for: none of these files comes from transformers 5's save; all of them from ours."""
    assert not RELEASE_LAYOUT_FILES & _files(transformers_save)
    speech_config = transformers_save / "speech_tokenizer" / "tokenizer_config.json"
    assert _json(speech_config)["tokenizer_class"] == "TokenizersBackend"

    written = write_release_layout(processor, transformers_save)
    assert {os.path.relpath(path, transformers_save).replace(os.sep, "/") for path in written} == RELEASE_LAYOUT_FILES
    assert RELEASE_LAYOUT_FILES <= _files(transformers_save)


def test_save_pretrained_writes_the_release_layout(processor, tmp_path):
    processor.save_pretrained(tmp_path / "saved")
    assert RELEASE_LAYOUT_FILES <= _files(tmp_path / "saved")
    assert _json(tmp_path / "saved" / "speech_tokenizer" / "tokenizer_config.json")["tokenizer_class"] == (
        "PreTrainedTokenizerFast"
    )


def test_preprocessor_config_is_the_feature_extractors_only_home(release_save, processor):
    """processor_config.json keeps the release's keys only, so AutoProcessor and WhisperFeatureExtractor find the
    feature extractor's settings in preprocessor_config.json alone."""
    folder, _ = release_save
    assert "feature_extractor" not in _json(folder / "processor_config.json")
    loaded = WhisperFeatureExtractor.from_pretrained(str(folder))
    assert loaded.to_dict() == processor.feature_extractor.to_dict()
    assert (loaded.feature_size, loaded.sampling_rate, loaded.hop_length, loaded.n_fft) == (128, 16000, 160, 400)

    os.remove(folder / "preprocessor_config.json")
    with pytest.raises(OSError, match="preprocessor_config.json"):
        AutoProcessor.from_pretrained(str(folder))


def test_special_tokens_maps_are_the_release_files_a_4x_loader_reads(tmp_path, release_save):
    """A 4.x tokenizer reads its special tokens from special_tokens_map.json when tokenizer_config.json has no
    added_tokens_decoder, and transformers 5 writes none; the maps written are the release's own: a processor loaded
    from the release-format fixture saves them back unchanged."""
    folder, _ = release_save
    for config in (folder / "tokenizer_config.json", folder / "speech_tokenizer" / "tokenizer_config.json"):
        assert "added_tokens_decoder" not in _json(config), config

    AutoProcessor.from_pretrained(str(PROCESSOR_FIXTURE)).save_pretrained(tmp_path / "again")
    for map_file in ("special_tokens_map.json", "speech_tokenizer/special_tokens_map.json"):
        assert _json(tmp_path / "again" / map_file) == _json(PROCESSOR_FIXTURE / map_file), map_file
    text_map = _json(tmp_path / "again" / "special_tokens_map.json")
    assert text_map["eos_token"] == {
        "content": "<|im_end|>",
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    }
    assert (text_map["audio_token"], text_map["text_sil_token"]) == ("<|AUDIO|>", "<|sil|>")


def test_vocab_and_merges_rebuild_the_text_tokenizer_without_tokenizer_json(release_save, processor, tmp_path):
    """vocab.json + merges.txt hold the whole BPE model: Qwen2Tokenizer loads a folder holding only those two files
    and tokenizes plain text as the processor's tokenizer does."""
    import shutil

    from transformers import Qwen2Tokenizer

    folder, _ = release_save
    only_bpe = tmp_path / "only_bpe"
    only_bpe.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(folder / name, only_bpe / name)
    rebuilt = Qwen2Tokenizer.from_pretrained(str(only_bpe))
    text = "hello the world, good morning"
    expected = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(expected) < len(text)  # the merges are used, not only single bytes
    assert rebuilt(text, add_special_tokens=False)["input_ids"] == expected


def test_speech_tokenizer_class_is_one_every_transformers_resolves(release_save, processor):
    """The release's PreTrainedTokenizerFast (transformers 4.x has no TokenizersBackend) loads the same speech
    vocabulary through AutoTokenizer."""
    folder, _ = release_save
    speech_folder = folder / "speech_tokenizer"
    assert _json(speech_folder / "tokenizer_config.json")["tokenizer_class"] == "PreTrainedTokenizerFast"
    loaded = AutoTokenizer.from_pretrained(str(speech_folder))
    assert loaded.get_vocab() == processor.speech_tokenizer.get_vocab()
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<|audio_bos|>", "<|audio_eos|>", "<|audio_pad|>")
