"""Whatever chat template a checkpoint folder carries, conversations render the Fun-Audio-Chat prompt layout;
the official scripts' calling convention (bare 16 kHz arrays) works.

The fixture template `official_default_chat_template.jinja` behaves like the official processor's default
(Qwen2-Audio style) template: it renders only items with an `audio`/`audio_url` key, as numbered "Audio N:" lines,
adds "You are a helpful assistant." when there is no system turn, and knows nothing of tools.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import soundfile as sf

from fun_audio_chat.processing import AUDIO_TEMPLATE, CHAT_TEMPLATE, DEFAULT_S2M_PROMPT

from .conftest import FIXTURES, PROCESSOR_FIXTURE, noise

OFFICIAL_LIKE_TEMPLATE = (FIXTURES / "official_default_chat_template.jinja").read_text()
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def _load(folder, **kwargs):
    from transformers import AutoProcessor

    import fun_audio_chat  # noqa: F401  (registers the processor)

    return AutoProcessor.from_pretrained(str(folder), **kwargs)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The released layout three ways: no template file, the official default template, ours (saved by us)."""
    root = tmp_path_factory.mktemp("released")
    bare = root / "no_template"
    shutil.copytree(PROCESSOR_FIXTURE, bare)
    official = root / "official_template"
    shutil.copytree(PROCESSOR_FIXTURE, official)
    (official / "chat_template.jinja").write_text(OFFICIAL_LIKE_TEMPLATE)
    ours = root / "our_template"
    _load(bare).save_pretrained(str(ours))
    clip_a, clip_b = noise(20000, seed=3), noise(36000, seed=4)
    wav = root / "question.wav"
    sf.write(str(wav), clip_a, 16000, subtype="FLOAT")
    return {"bare": bare, "official": official, "ours": ours, "wav": wav, "clip_a": clip_a, "clip_b": clip_b}


def _conversations(folders):
    wav, clip_a, clip_b = str(folders["wav"]), folders["clip_a"], folders["clip_b"]
    wav_bytes = folders["wav"].read_bytes()
    return {
        "path_and_text": (
            [{"role": "user", "content": [{"type": "audio", "path": wav}, {"type": "text", "text": "What is said?"}]}],
            {},
        ),
        "array_bytes_speech_output": (
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "audio", "audio": clip_b, "sampling_rate": 16000},
                        {"type": "audio", "audio": wav_bytes},
                    ],
                }
            ],
            {"speech_output": True},
        ),
        "tools_and_results": (
            [
                {"role": "user", "content": [{"type": "audio", "path": wav}]},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
                    ],
                },
                {"role": "tool", "content": {"temperature": 21}},
            ],
            {"tools": [WEATHER_TOOL]},
        ),
        "multi_turn_with_system": (
            [
                {"role": "system", "content": DEFAULT_S2M_PROMPT},
                {"role": "user", "content": [{"type": "audio", "audio": clip_a, "sampling_rate": 16000}]},
                {"role": "assistant", "content": [{"type": "text", "text": "It is sunny."}]},
                {"role": "user", "content": [{"type": "audio", "audio": clip_b, "sampling_rate": 16000}]},
            ],
            {},
        ),
    }


def _inputs(processor, messages, **kwargs):
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="np", **kwargs
    )


def _assert_same(a, b):
    assert sorted(a.keys()) == sorted(b.keys())
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


def test_a_foreign_checkpoint_template_is_kept_aside_and_ours_renders(folders):
    processor = _load(folders["official"])
    assert processor.chat_template == CHAT_TEMPLATE
    assert processor.checkpoint_chat_template == OFFICIAL_LIKE_TEMPLATE
    assert _load(folders["bare"]).chat_template == CHAT_TEMPLATE
    assert _load(folders["ours"]).chat_template == CHAT_TEMPLATE


@pytest.mark.parametrize(
    "case", ["path_and_text", "array_bytes_speech_output", "tools_and_results", "multi_turn_with_system"]
)
def test_every_released_template_gives_the_same_model_inputs(folders, processor, case):
    messages, kwargs = _conversations(folders)[case]
    reference = _inputs(processor, messages, **kwargs)  # the tiny processor: our template, built in code
    assert (reference["input_ids"] == processor.audio_token_id).any()
    for name in ("bare", "official", "ours"):
        _assert_same(_inputs(_load(folders[name]), messages, **kwargs), reference)


def test_tools_and_speech_output_reach_the_prompt_from_an_official_template_folder(folders):
    processor = _load(folders["official"])
    messages, kwargs = _conversations(folders)["tools_and_results"]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
    assert '"name": "get_weather"' in text and "<tools>" in text and "<tool_response>" in text
    spoken = processor.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, speech_output=True
    )
    assert spoken.startswith(f"<|im_start|>system\n{DEFAULT_S2M_PROMPT}<|im_end|>\n")


def test_typed_items_equal_the_string_content_layout_of_the_official_scripts(folders):
    """The official scripts put AUDIO_TEMPLATE in string contents and pass the arrays to processor(); any template
    renders those verbatim, so the official-like template (used explicitly) must give our typed-item inputs."""
    processor = _load(folders["official"])
    clip = folders["clip_a"]
    typed = [
        {"role": "system", "content": DEFAULT_S2M_PROMPT},
        {
            "role": "user",
            "content": [{"type": "audio", "audio": clip, "sampling_rate": 16000}, {"type": "text", "text": "Hi?"}],
        },
    ]
    strings = [
        {"role": "system", "content": DEFAULT_S2M_PROMPT},
        {"role": "user", "content": AUDIO_TEMPLATE + "\nHi?"},
    ]
    prompt = processor.apply_chat_template(strings, add_generation_prompt=True, chat_template=OFFICIAL_LIKE_TEMPLATE)
    assert prompt == processor.apply_chat_template(strings, add_generation_prompt=True)
    official_call = processor(text=prompt, audio=[clip], return_tensors="np")
    _assert_same(official_call, _inputs(processor, typed))


def test_an_explicit_template_is_used_exactly(folders):
    clip = folders["clip_a"]
    messages = [{"role": "user", "content": [{"type": "audio", "audio": clip, "sampling_rate": 16000}]}]
    processor = _load(folders["official"])
    text = processor.apply_chat_template(messages, add_generation_prompt=True, chat_template=OFFICIAL_LIKE_TEMPLATE)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n<|im_end|>\n<|im_start|>assistant\n"
    )
    pinned = _load(folders["official"], chat_template=OFFICIAL_LIKE_TEMPLATE)
    assert pinned.chat_template == OFFICIAL_LIKE_TEMPLATE
    assert pinned.apply_chat_template(messages, add_generation_prompt=True) == text


def test_saving_a_loaded_official_folder_writes_a_template_that_keeps_the_layout(folders, tmp_path, processor):
    _load(folders["official"]).save_pretrained(str(tmp_path))
    assert (tmp_path / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    messages, kwargs = _conversations(folders)["tools_and_results"]
    _assert_same(_inputs(_load(tmp_path), messages, **kwargs), _inputs(processor, messages, **kwargs))


def test_official_call_on_bare_16k_arrays(processor, caplog):
    from transformers.utils import logging

    clip_a, clip_b = noise(20000, seed=3), noise(36000, seed=4)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": AUDIO_TEMPLATE + "\n" + AUDIO_TEMPLATE}], add_generation_prompt=True
    )
    logging.get_logger("fun_audio_chat.processing.processing_fun_audio_chat").warning_once.cache_clear()
    logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            bare = processor(text=prompt, audio=[clip_a, clip_b], return_tensors="np")
            processor(text=prompt, audio=[clip_a, clip_b], return_tensors="np")
    finally:
        logging.disable_propagation()
    warnings = [r for r in caplog.records if "sampling_rate=" in r.getMessage()]
    assert len(warnings) == 1 and "16000 Hz" in warnings[0].getMessage()
    _assert_same(bare, processor(text=prompt, audio=[clip_a, clip_b], sampling_rate=16000, return_tensors="np"))
    typed = [
        {"role": "user", "content": [{"type": "audio", "audio": c, "sampling_rate": 16000} for c in (clip_a, clip_b)]}
    ]
    _assert_same(bare, _inputs(processor, typed))
    # an explicit rate is still resampled: the 8 kHz version of the same duration has the same layout
    eight_k = processor(text=prompt, audio=[clip_a[::2], clip_b[::2]], sampling_rate=8000, return_tensors="np")
    np.testing.assert_array_equal(eight_k["input_ids"], bare["input_ids"])


def test_typed_chat_items_still_refuse_a_bare_array(processor):
    messages = [{"role": "user", "content": [{"type": "audio", "audio": noise(16000)}]}]
    with pytest.raises(ValueError, match="sampling rate"):
        processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
