"""Contracts transformers' common model and generation test mixins check for every in-tree model, as our own tests
(the mixins themselves are transformers' test code and are not vendored; docs/architecture.md#common-test-mixins gives
the run against them and what stays excluded).

``generate``'s return value: with ``return_dict_in_generate=True`` always a ``ModelOutput`` with ``sequences``; without
it, the ids tensor for a text reply and the official ``(sequences, speech_ids)`` tuple with speech.
"""

from __future__ import annotations

import pytest
import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.utils import ModelOutput

from tests.modeling.model_tester import FunAudioChatModelTester

GREEDY = {"do_sample": False, "speech_do_sample": False, "max_new_tokens": 4, "force_audio_bos": True}


@pytest.fixture(scope="module")
def model_and_inputs():
    tester = FunAudioChatModelTester()
    _, inputs = tester.prepare_config_and_inputs()
    return tester.create_model(), inputs


@pytest.mark.parametrize("mode", ["text", "audio"])
def test_return_dict_in_generate_always_gives_a_model_output_with_sequences(model_and_inputs, mode):
    model, inputs = model_and_inputs
    with torch.no_grad():
        out = model.generate(**inputs, **GREEDY, generation_mode=mode, return_dict_in_generate=True)
        plain = model.generate(**inputs, **GREEDY, generation_mode=mode)
    assert isinstance(out, ModelOutput) and isinstance(out, GenerateDecoderOnlyOutput)
    prompt_length = inputs["input_ids"].shape[1]
    assert out.sequences.shape[0] == inputs["input_ids"].shape[0] and out.sequences.shape[1] > prompt_length
    if mode == "text":
        assert torch.is_tensor(plain) and torch.equal(plain, out.sequences)
        assert getattr(out, "speech_ids", None) is None
    else:
        sequences, speech_ids = plain
        assert torch.equal(sequences, out.sequences) and torch.equal(speech_ids, out.speech_ids)


def test_return_dict_carries_the_requested_step_tensors(model_and_inputs):
    model, inputs = model_and_inputs
    with torch.no_grad():
        out = model.generate(**inputs, **GREEDY, return_dict_in_generate=True, output_scores=True, output_logits=True)
    steps = out.sequences.shape[1] - inputs["input_ids"].shape[1]
    vocab = model.config.text_config.vocab_size
    assert len(out.scores) == len(out.logits) == steps
    assert all(score.shape == (inputs["input_ids"].shape[0], vocab) for score in out.scores)
