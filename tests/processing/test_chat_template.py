"""Chat template and prompt layout (docs/official-format.md#prompt), model inputs from apply_chat_template, batching."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fun_audio_chat.processing import (
    AUDIO_TEMPLATE,
    CHAT_TEMPLATE,
    DEFAULT_S2M_PROMPT,
    DEFAULT_S2T_PROMPT,
    SPOKEN_S2M_PROMPT,
)

from .conftest import load_oracle, noise

# The oracle's system text is the token ids 101..106, which the tiny vocabulary spells "efghij".
ORACLE_SYSTEM = "efghij"
UA, UB = 27700, 41000  # the oracle's user audio lengths (9 and 13 <|AUDIO|> positions)


def _conversation(num_samples, system=ORACLE_SYSTEM, instruction=None, seed=0):
    content = [{"type": "audio", "audio": noise(num_samples, seed=seed), "sampling_rate": 16000}]
    if instruction:
        content.append({"type": "text", "text": instruction})
    messages = [{"role": "user", "content": content}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return messages


def test_official_prompt_strings():
    assert DEFAULT_S2T_PROMPT == "You are asked to generate text tokens."
    assert DEFAULT_S2M_PROMPT == "You are asked to generate both text and speech tokens at the same time."
    assert SPOKEN_S2M_PROMPT.startswith(DEFAULT_S2M_PROMPT + " ") and "四川话和粤语" in SPOKEN_S2M_PROMPT
    assert AUDIO_TEMPLATE == "<|audio_bos|><|AUDIO|><|audio_eos|>"


def test_rendered_prompt_layout(processor):
    messages = _conversation(UA, system=DEFAULT_S2T_PROMPT, instruction="What is said here?")
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are asked to generate text tokens.<|im_end|>\n"
        "<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|>\nWhat is said here?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_prompt_tokens_equal_official_layout_token_for_token(processor):
    """input_ids of the expanded prompt = tokenizing the docs/official-format.md#prompt string with n = ceil(int(dur*25)/5) placeholders."""
    messages = _conversation(UA, system=DEFAULT_S2M_PROMPT, instruction="Please answer.")
    out = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    n = math.ceil(int(UA / 16000 * 25) / 5)
    assert n == 9
    expected_text = (
        f"<|im_start|>system\n{DEFAULT_S2M_PROMPT}<|im_end|>\n<|im_start|>user\n<|audio_bos|>"
        + "<|AUDIO|>" * n
        + "<|audio_eos|>\nPlease answer.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert out["input_ids"][0] == processor.tokenizer(expected_text)["input_ids"]


def test_inputs_equal_oracle_infer_b1(processor):
    """The processor rebuilds the oracle's inference inputs (ids, masks, speech ids) for the same audio length."""
    oracle = load_oracle("infer_b1")
    out = processor.apply_chat_template(
        _conversation(UA), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    for key in ("input_ids", "attention_mask", "speech_ids", "speech_attention_mask", "feature_exist_mask"):
        assert torch.equal(out[key], oracle[key]), key
    assert out["feature_attention_mask"].sum() == oracle["feature_attention_mask"].sum() == 174


def test_batch_is_left_padded_and_equals_oracle_infer_b2(processor):
    oracle = load_oracle("infer_b2_leftpad")
    batch = [_conversation(UA, seed=1), _conversation(UB, seed=2)]
    out = processor.apply_chat_template(
        batch, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    for key in ("input_ids", "attention_mask", "speech_ids", "speech_attention_mask", "feature_exist_mask"):
        assert torch.equal(out[key], oracle[key]), key
    assert out["input_ids"][0, :4].tolist() == [500] * 4  # left padding with <|endoftext|>
    assert out["feature_attention_mask"].sum(-1).tolist() == [174, 257]
    assert out["input_features"].shape == (2, 128, 3000)  # Whisper's 30 s window, as the official processor
    assert out["speech_ids"].shape[1] % 5 == 0


def test_processor_inputs_drive_the_model_like_the_oracle(processor, oracle_model_a):
    """Processor output (with the oracle's random features swapped in) gives the oracle's forward logits."""
    oracle_in = load_oracle("infer_b1")
    oracle_out = load_oracle("infer_b1", "outputs_forward.safetensors")
    out = processor.apply_chat_template(
        _conversation(UA), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    inputs = dict(out)
    inputs["input_features"] = oracle_in["input_features"][..., :174]
    with torch.no_grad():
        result = oracle_model_a(**inputs)
    torch.testing.assert_close(result.logits, oracle_out["text_logits"], atol=1e-4, rtol=0)


def test_all_model_inputs_shapes_and_types(processor):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "audio", "audio": noise(16000, seed=1), "sampling_rate": 16000},
                {"type": "audio", "audio": noise(48000, seed=2), "sampling_rate": 48000},
                {"type": "text", "text": "compare them"},
            ],
        },
    ]
    out = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert set(out.keys()) == {
        "input_ids",
        "attention_mask",
        "input_features",
        "feature_attention_mask",
        "feature_exist_mask",
        "speech_ids",
        "speech_attention_mask",
    }
    assert out["input_features"].dtype == torch.float32 and out["input_features"].shape[:2] == (2, 128)
    assert out["feature_attention_mask"].sum(-1).tolist() == [100, 100]
    assert out["feature_exist_mask"].dtype == torch.bool and out["feature_exist_mask"].tolist() == [True, True]
    assert out["speech_ids"].shape == (2, 25) and (out["speech_ids"] == processor.speech_pad_token_id).all()
    assert out["speech_attention_mask"].sum(-1).tolist() == [25, 25]
    ids = out["input_ids"][0].tolist()
    assert ids.count(processor.audio_token_id) == 10
    # default system prompt (no system message): speech-to-text
    assert processor.decode(ids).startswith(f"<|im_start|>system\n{DEFAULT_S2T_PROMPT}<|im_end|>")


def test_speech_output_switch_and_explicit_system(processor):
    text = processor.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, speech_output=True
    )
    assert text.startswith(f"<|im_start|>system\n{DEFAULT_S2M_PROMPT}<|im_end|>\n")
    text = processor.apply_chat_template(
        [{"role": "system", "content": SPOKEN_S2M_PROMPT}, {"role": "user", "content": "hi"}],
        add_generation_prompt=True,
    )
    assert text.startswith(f"<|im_start|>system\n{SPOKEN_S2M_PROMPT}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n")


def test_multi_turn_with_earlier_assistant_text(processor):
    messages = [
        {"role": "system", "content": DEFAULT_S2M_PROMPT},
        {"role": "user", "content": [{"type": "audio", "audio": noise(16000, seed=1), "sampling_rate": 16000}]},
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "It is sunny."}, {"type": "audio", "speech_codes": [1, 2, 3]}],
        },
        {"role": "user", "content": [{"type": "audio", "audio": noise(32000, seed=2), "sampling_rate": 16000}]},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == (
        f"<|im_start|>system\n{DEFAULT_S2M_PROMPT}<|im_end|>\n"
        f"<|im_start|>user\n{AUDIO_TEMPLATE}<|im_end|>\n"
        "<|im_start|>assistant\nIt is sunny.<|im_end|>\n"
        f"<|im_start|>user\n{AUDIO_TEMPLATE}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    out = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    # only the two user audios are inputs; the assistant's reply is history text
    assert out["input_features"].shape[0] == 2
    assert (out["input_ids"][0] == processor.audio_token_id).sum().item() == 5 + 10


def test_direct_call_adds_missing_audio_bos_eos(processor):
    clip = noise(16000)
    bare = processor(text="<|im_start|>user\n<|AUDIO|><|im_end|>\n", audio=clip, sampling_rate=16000)
    full = processor(
        text="<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|><|im_end|>\n", audio=clip, sampling_rate=16000
    )
    assert bare["input_ids"] == full["input_ids"]
    ids = full["input_ids"][0]
    start = ids.index(processor.audio_bos_token_id)
    assert ids[start : start + 7] == [503] + [505] * 5 + [504]


def test_right_padding_on_request_and_text_only_prompts(processor):
    out = processor(
        text=["<|im_start|>user\nhi<|im_end|>\n", "<|im_start|>user\nhello there friend<|im_end|>\n"],
        padding_side="right",
    )
    assert out["attention_mask"][0][-1] == 0 and out["input_ids"][0][-1] == processor.text_pad_token_id
    assert "input_features" not in out


def test_template_is_saved_as_jinja(tmp_path, processor):
    processor.save_pretrained(str(tmp_path))
    assert (tmp_path / "chat_template.jinja").read_text() == CHAT_TEMPLATE


def test_generation_mask_marks_assistant_turns(processor):
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    out = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"][0], out["assistant_masks"][0]
    marked = [i for i, m in zip(ids, mask) if m]
    assert processor.tokenizer.decode(marked) == "hello<|im_end|>\n"


@pytest.mark.parametrize("bad_content", [[{"type": "audio"}]])
def test_audio_item_without_source(processor, bad_content):
    with pytest.raises(ValueError, match='needs one of "audio", "path" or "url"'):
        processor.apply_chat_template([{"role": "user", "content": bad_content}], tokenize=True)


def test_numpy_return_and_lists(processor):
    out = processor.apply_chat_template(_conversation(UA), add_generation_prompt=True, tokenize=True, return_dict=True)
    assert isinstance(out["input_ids"], list) and isinstance(out["input_features"], np.ndarray)
