"""The context-length rule (``model.context_fit``): ``generate``'s check, the Speech Refined Head cache it allocates
and the server's check agree at the boundary — a request that fits exactly runs everywhere, one step more is refused
everywhere."""

from __future__ import annotations

import pytest
import torch

from fun_audio_chat.modeling import generation_fun_audio_chat as generation
from fun_audio_chat.serving.engine import ServingEngine, TurnRequest
from fun_audio_chat.tiny import tiny_model_and_processor

GREEDY = {"do_sample": False, "speech_do_sample": False}


@pytest.fixture
def setup(monkeypatch):
    """A tiny model whose limits sit just above a short prompt, its prompt, and the SRH allocations it makes."""
    model, processor = tiny_model_and_processor(0)
    messages = [{"role": "system", "content": "Hi."}, {"role": "user", "content": "yo"}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, speech_output=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    prompt = int(inputs["input_ids"].shape[1])
    k = model.group_size
    model.config.text_config.max_position_embeddings = prompt + 6  # text: 6 new tokens fit exactly
    head_config = model.audio_invert_tower.crq_transformer.config
    head_config.max_position_embeddings = k * (prompt + 4 + 1)  # speech: 4 new tokens fit exactly
    allocations = []
    start = generation.SpeechDecoder.start

    def recording_start(self, prompt_ids, prompt_embeds, attention_mask, new_positions, max_new_tokens):
        start(self, prompt_ids, prompt_embeds, attention_mask, new_positions, max_new_tokens)
        allocations.append((new_positions, self.total))

    monkeypatch.setattr(generation.SpeechDecoder, "start", recording_start)
    return model, inputs, prompt, allocations


def _server_check(model, prompt, max_new_tokens, speech):
    engine = ServingEngine(model, processor=None)  # _check_fits reads the model only; no threads are started
    engine._check_fits(prompt, TurnRequest(messages=[], speech=speech, max_new_tokens=max_new_tokens))


def test_a_spoken_reply_that_fits_exactly_runs_and_one_step_more_is_refused_everywhere(setup):
    model, inputs, prompt, allocations = setup
    k, head_limit = model.group_size, model.audio_invert_tower.crq_transformer.config.max_position_embeddings
    fit = model.context_fit(prompt, 4, speech=True)
    assert fit.fits and fit.speech_head_positions == head_limit and fit.max_prompt_length == prompt
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=4, force_audio_bos=True, **GREEDY)
    assert allocations == [(prompt, fit.speech_head_positions)]  # the check counts what generate allocates
    _server_check(model, prompt, 4, speech=True)

    over = model.context_fit(prompt, 5, speech=True)
    assert not over.fits and over.speech_head_positions == head_limit + k and over.max_prompt_length == prompt - 1
    with pytest.raises(ValueError, match=f"Speech Refined Head would need {head_limit + k} positions"):
        model.generate(**inputs, max_new_tokens=5, force_audio_bos=True, **GREEDY)
    with pytest.raises(ValueError, match=r"exceeds the model's context.*lower max_tokens"):
        _server_check(model, prompt, 5, speech=True)
    # a text reply of the same length fits: only the speech head is out of room
    _server_check(model, prompt, 5, speech=False)
    assert model.context_fit(prompt, 5, speech=False).fits


def test_a_text_reply_that_fits_exactly_runs_and_one_step_more_is_refused_everywhere(setup):
    model, inputs, prompt, _ = setup
    assert model.context_fit(prompt, 6, speech=False).fits
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=6, return_speech=False, **GREEDY)
    _server_check(model, prompt, 6, speech=False)
    fit = model.context_fit(prompt, 7, speech=False)
    assert not fit.fits and fit.llm_positions == prompt + 7 and fit.max_prompt_length == prompt - 1
    with pytest.raises(ValueError, match="the LLM's max_position_embeddings is"):
        model.generate(**inputs, max_new_tokens=7, return_speech=False, **GREEDY)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        _server_check(model, prompt, 7, speech=False)


def test_a_continued_cache_counts_only_the_new_positions_of_the_speech_head(setup):
    model, inputs, prompt, allocations = setup
    model.config.text_config.max_position_embeddings = 1024
    model.audio_invert_tower.crq_transformer.config.max_position_embeddings = 4096
    with torch.no_grad():
        first = model.generate(**inputs, max_new_tokens=3, return_dict_in_generate=True, **GREEDY)
        from fun_audio_chat.transformers_compat import CACHE_NAME, cache_of

        cache = cache_of(first)
        cached = cache.get_seq_length()
        sequence = first.sequences
        model.generate(
            input_ids=sequence,
            attention_mask=torch.ones_like(sequence),
            max_new_tokens=3,
            **{CACHE_NAME: cache},
            **GREEDY,
        )
    new_positions, allocated = allocations[-1]
    assert new_positions == sequence.shape[1] - cached > 0
    fit = model.context_fit(sequence.shape[1], 3, speech=True, cached_length=cached)
    assert fit.speech_head_positions == allocated
    # the head's budget without the cache would count the whole conversation
    assert model.context_fit(sequence.shape[1], 3, speech=True).speech_head_positions > allocated


def test_bad_arguments_and_a_model_without_the_speech_head():
    from fun_audio_chat import FunAudioChatForConditionalGeneration
    from fun_audio_chat.tiny import tiny_config

    model, _ = tiny_model_and_processor(0)
    with pytest.raises(ValueError, match="cached_length <= prompt_length"):
        model.context_fit(5, 3, cached_length=6)
    text_only = FunAudioChatForConditionalGeneration(tiny_config(audio_config={"enable_audio_invert_tower": False}))
    assert text_only.context_fit(10, 3).speech_head_positions is None  # speech defaults to what the model has
    with pytest.raises(ValueError, match="needs the Speech Refined Head"):
        text_only.context_fit(10, 3, speech=True)
