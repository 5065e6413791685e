"""The Speech Refined Head's compiled unit: one LLM step's k sub-steps, their code selection and cache writes as one
graph (``decode_static_group``), and the on-device code rule it uses."""

import pytest
import torch

from fun_audio_chat.modeling.speech_head import SpeechHeadDecoder, decode_static_group
from fun_audio_chat.modeling.speech_sampling import (
    GREEDY_SPEECH,
    SpeechSamplingSettings,
    select_code_on_device,
    warp_logits,
)

from .model_tester import FunAudioChatModelTester

SAMPLED = SpeechSamplingSettings(do_sample=True, temperature=0.8, top_p=0.9, top_k=20, repetition_penalty=1.2)


@pytest.fixture(scope="module")
def model():
    return FunAudioChatModelTester().create_model()


def _prefilled_decoder(model, static: bool, prompt_positions: int = 6):
    """A decoder over a left-padded batch of 2 with ``prompt_positions`` sub-positions prefilled."""
    head = model.audio_invert_tower
    capacity = prompt_positions + 4 * head.group_size
    key_mask = torch.ones(2, capacity, dtype=torch.long)
    key_mask[0, :2] = 0
    positions = (torch.arange(capacity)[None, :] - (1 - key_mask[:, :1]) * 2).clamp(min=0)
    decoder = SpeechHeadDecoder(head, positions, key_mask, static=static)
    generator = torch.Generator().manual_seed(0)
    hidden = head.lm_head.weight.shape[1]
    with torch.no_grad():
        decoder.prefill(torch.randn(2, prompt_positions, hidden, generator=generator))
    return decoder, torch.randn(2, 1, hidden, generator=generator)


def _group_inputs(model, settings):
    codebook = model.config.audio_config.codebook_size
    seen = torch.zeros(2, codebook, dtype=torch.bool) if settings.penalised else None
    if seen is not None:
        seen[:, :7] = True
    uniforms = (
        torch.rand(2, model.group_size, generator=torch.Generator().manual_seed(1)) if settings.do_sample else None
    )
    return torch.tensor([3, 4]), seen, uniforms


def _run_group(decoder, states, previous_code, seen, uniforms, settings, group=decode_static_group):
    return group(
        decoder.head,
        decoder.cache,
        states,
        previous_code,
        seen,
        uniforms,
        decoder.positions,
        decoder.rotary,
        decoder.key_mask,
        settings,
    )


@pytest.mark.parametrize("settings", [GREEDY_SPEECH, SAMPLED], ids=["greedy", "sampled"])
def test_speech_group_traces_as_one_graph_without_breaks(model, settings):
    """fullgraph=True holds: sub-steps, selection (temperature, top-k, top-p, repetition penalty) and cache writes
    trace into a single graph (a host sync such as ``.item()`` or a Python branch on a value would break it)."""
    decoder, states = _prefilled_decoder(model, static=True)
    previous_code, seen, uniforms = _group_inputs(model, settings)
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = _run_group(
            decoder, states, previous_code, seen, uniforms, settings, group=torch._dynamo.explain(decode_static_group)
        )
    torch._dynamo.reset()
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("settings", [GREEDY_SPEECH, SAMPLED], ids=["greedy", "sampled"])
def test_static_group_equals_one_sub_step_at_a_time_on_the_default_cache(model, settings):
    """The fused group (static buffers, whole-buffer masked attention) decodes what the default path's decoder
    decodes sub-step by sub-step, with the same on-device rule and draws."""
    previous_code, seen, uniforms = _group_inputs(model, settings)
    static, states = _prefilled_decoder(model, static=True)
    default, _ = _prefilled_decoder(model, static=False)
    head = model.audio_invert_tower
    with torch.no_grad():
        codes, logits, found_seen = _run_group(static, states, previous_code, seen, uniforms, settings)
        sub_states = head.ungroup(states)
        expected_codes, expected_logits, expected_seen = [], [], seen
        code = previous_code
        for sub_step in range(model.group_size):
            step_logits = default.step(sub_states[:, sub_step : sub_step + 1] + head.code_embeddings(code)[:, None])
            uniform = None if uniforms is None else uniforms[:, sub_step]
            code = select_code_on_device(step_logits, expected_seen, settings, uniform)
            if expected_seen is not None:
                expected_seen = expected_seen.scatter(1, code[:, None], True)
            expected_codes.append(code)
            expected_logits.append(step_logits)
    torch.testing.assert_close(logits, torch.stack(expected_logits, 1), atol=1e-5, rtol=1e-5)
    assert torch.equal(codes, torch.stack(expected_codes, 1))
    if seen is not None:
        assert torch.equal(found_seen, expected_seen)
    assert int(static.cache.layers[0].cumulative_length) == 6 + model.group_size


def test_on_device_warping_equals_transformers_warpers():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2)) * 3
    for settings in (
        SAMPLED,
        SpeechSamplingSettings(do_sample=True, temperature=0.5, top_p=1.0, top_k=0, repetition_penalty=1.0),
        SpeechSamplingSettings(do_sample=True, temperature=1.0, top_p=0.3, top_k=0, repetition_penalty=1.0),
    ):
        assert torch.equal(warp_logits(logits, settings), settings.warpers()(None, logits))


def test_on_device_sampling_inverts_the_cumulative_distribution():
    """A uniform draw u picks the first code whose cumulative probability exceeds u; codes cut by top-k / top-p
    are never picked, whatever the draw."""
    settings = SpeechSamplingSettings(do_sample=True, temperature=1.0, top_p=1.0, top_k=2, repetition_penalty=1.0)
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0]]).log_softmax(-1).expand(5, -1)  # top-2 keeps codes 1 and 3
    draws = torch.tensor([0.0, 0.2, 0.49, 0.51, 0.999999])
    codes = select_code_on_device(logits, None, settings, draws)
    assert codes.tolist() == [1, 1, 1, 3, 3]


def test_text_decode_step_traces_without_breaks(model):
    """A text reply runs transformers' own loop, which feeds the LLM one id per step and compiles that forward: the
    step must not read tensor values (the prompt's id checks stay with the prefill), or every token pays host syncs
    and the compiled step breaks into pieces."""
    from transformers import StaticCache

    prompt = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    cache = StaticCache(config=model.config, max_cache_len=16)
    step = {"input_ids": torch.tensor([[5]]), "cache_position": torch.tensor([8]), "use_cache": True}
    torch._dynamo.reset()
    with torch.no_grad():
        model(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(8), use_cache=True)
        explanation = torch._dynamo.explain(model)(past_key_values=cache, **step)
    torch._dynamo.reset()
    assert explanation.graph_break_count == 0, explanation.break_reasons
