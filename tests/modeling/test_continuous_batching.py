"""ContinuousBatchDecoder: rows that join and leave a running batch reply exactly as generate() does alone (fp32).

Every scenario runs twice: on the default (dynamic-cache) decoder and on the compiled one (fixed cache slots;
dynamo's eager backend, so the graphs are traced with ``fullgraph=True`` without inductor's compile time).
"""

import numpy as np
import pytest
import torch
from transformers import CompileConfig

from fun_audio_chat.modeling import ContinuousBatchDecoder, RowStep
from fun_audio_chat.tiny import tiny_model_and_processor

# The server's greedy speech request: the reply opens with <|audio_bos|>; speech codes greedy with the model's
# default speech repetition penalty.
GREEDY_SPEECH = {"do_sample": False, "speech_do_sample": False, "force_audio_bos": True}
TEXT_ONLY = {"do_sample": False, "return_speech": False}


@pytest.fixture(scope="module")
def model_and_processor():
    model, processor = tiny_model_and_processor()
    return model.float(), processor


def compiled_decoder(model, backend: str = "eager", slots: int = 4, context: int = 256) -> ContinuousBatchDecoder:
    decoder = ContinuousBatchDecoder(model, CompileConfig(backend=backend), slots=slots, context=context)
    decoder.warm_up()
    return decoder


@pytest.fixture(params=["dynamic", "slots", pytest.param("slots-inductor", marks=pytest.mark.slow)])
def new_decoder(request):
    """Builds the decoder under test for a model: the default one, or the compiled one on 4 slots (traced by
    dynamo's eager backend, or compiled by inductor)."""
    if request.param == "dynamic":
        return ContinuousBatchDecoder
    backend = "inductor" if request.param == "slots-inductor" else "eager"
    return lambda model: compiled_decoder(model, backend=backend)


def _prompt(processor, text: str, audio_seconds: float = 0.0, speech: bool = True, seed: int = 0):
    content = [{"type": "text", "text": text}]
    if audio_seconds:
        samples = np.random.default_rng(seed).standard_normal(int(16000 * audio_seconds)) * 0.1
        content.insert(0, {"type": "audio", "audio": samples.astype(np.float32), "sampling_rate": 16000})
    return processor.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        speech_output=speech,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )


def _solo(model, inputs, settings) -> tuple[list[int], list[int] | None]:
    """generate() on one prompt: the reply's text ids and its speech codes (None without speech)."""
    output = model.generate(**inputs, **settings, return_dict_in_generate=True)
    tokens = output.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    if getattr(output, "speech_ids", None) is None:
        return tokens, None
    return tokens, output.speech_ids[0][output.speech_attention_mask[0].bool()].tolist()


def _run(decoder, arrivals: dict[int, list[tuple[str, dict, dict]]], cancel_after: dict[str, int] | None = None):
    """Step the decoder, adding each arrival after that many step() calls and cancelling rows after the given
    number of their own steps; returns per name the text ids, speech codes, RowSteps and step() calls made."""
    cancel_after = cancel_after or {}
    names, steps = {}, {}
    calls = 0
    while decoder.has_rows or any(when >= calls for when in arrivals):
        for name, inputs, settings in arrivals.get(calls, []):
            row = decoder.add(inputs, **settings)
            names[row] = name
            steps[name] = []
        for step in decoder.step():
            steps[names[step.row_id]].append(step)
        calls += 1
        for name, count in cancel_after.items():
            row_id = next(row for row, row_name in names.items() if row_name == name)
            if len(steps[name]) == count:
                decoder.cancel(row_id)
    results = {}
    for name, row_steps in steps.items():
        codes = [code for step in row_steps if step.speech_group is not None for code in step.speech_group.tolist()]
        results[name] = ([step.token_id for step in row_steps], codes, row_steps)
    return results, calls


def _assert_equal_solo(model, results, requests):
    for name, (inputs, settings) in requests.items():
        tokens, codes, steps = results[name]
        solo_tokens, solo_codes = _solo(model, inputs, settings)
        assert tokens == solo_tokens, f"{name}: text differs from generate() alone"
        assert codes == (solo_codes or []), f"{name}: speech codes differ from generate() alone"
        assert steps[-1].finished and not any(step.finished for step in steps[:-1])


def test_staggered_arrivals_reply_as_generate_alone(model_and_processor, new_decoder):
    """A speaks from an audio prompt; B joins after A's 3rd step (short text prompt, speech, another speech
    repetition penalty); C after A's 5th (longer text prompt, text-only reply)."""
    model, processor = model_and_processor
    requests = {
        "A": (_prompt(processor, "hello there", audio_seconds=1.0), {**GREEDY_SPEECH, "max_new_tokens": 14}),
        "B": (_prompt(processor, "good"), {**GREEDY_SPEECH, "max_new_tokens": 9, "speech_repetition_penalty": 1.0}),
        "C": (
            _prompt(processor, "thank you helpful assistant good morning number string", speech=False),
            {**TEXT_ONLY, "max_new_tokens": 8},
        ),
    }
    arrivals = {0: [("A", *requests["A"])], 3: [("B", *requests["B"])], 5: [("C", *requests["C"])]}
    results, calls = _run(new_decoder(model), arrivals)
    _assert_equal_solo(model, results, requests)
    assert len(results["A"][1]) > 0 and len(results["B"][1]) > 0 and results["C"][1] == []
    assert results["A"][2][-1].finish_reason == "length"
    # Every row was decoded in the shared batch: A's 14 steps set the pace, nobody waited for a batch to end.
    assert calls == 14


def test_rows_leaving_early_do_not_change_the_others(model_and_processor, new_decoder):
    """B stops on an end-of-reply token after a few steps, C is cancelled after 4 steps, D finishes at its prefill;
    A and B reply as alone, C produces nothing more once cancelled."""
    model, processor = model_and_processor
    prompt_a = _prompt(processor, "hello there good morning", audio_seconds=0.6, seed=1)
    prompt_b = _prompt(processor, "thank you")
    a_tokens, _ = _solo(model, prompt_a, {**GREEDY_SPEECH, "max_new_tokens": 12})
    b_tokens, _ = _solo(model, prompt_b, {**GREEDY_SPEECH, "max_new_tokens": 12})
    # An end-of-reply id B emits at its 4th step (and not before), so B stops early with reason "stop".
    stop_id = b_tokens[3]
    assert stop_id not in b_tokens[:3], "fixture: pick a token that first appears at B's 4th step"
    requests = {
        "A": (prompt_a, {**GREEDY_SPEECH, "max_new_tokens": 12}),
        "B": (prompt_b, {**GREEDY_SPEECH, "max_new_tokens": 12, "eos_token_id": stop_id}),
        "D": (_prompt(processor, "good"), {**GREEDY_SPEECH, "max_new_tokens": 1}),
        # E joins in the step() call in which B leaves: one regrouping both drops and adds a row.
        "E": (_prompt(processor, "number", audio_seconds=0.8, seed=3), {**GREEDY_SPEECH, "max_new_tokens": 6}),
    }
    cancelled = (
        _prompt(processor, "good morning city", audio_seconds=0.4, seed=2),
        {**GREEDY_SPEECH, "max_new_tokens": 12},
    )
    arrivals = {
        0: [("A", *requests["A"]), ("B", *requests["B"]), ("C", *cancelled)],
        2: [("D", *requests["D"])],
        3: [("E", *requests["E"])],
    }
    results, _ = _run(new_decoder(model), arrivals, cancel_after={"C": 4})
    _assert_equal_solo(model, results, requests)
    assert results["A"][0] == a_tokens
    assert results["B"][2][-1].finish_reason == "stop" and len(results["B"][0]) == 4
    assert results["D"][2][0].finished and results["D"][0] == [model.config.text_config.audio_bos_index]
    c_tokens = results["C"][0]
    assert len(c_tokens) == 4 and not results["C"][2][-1].finished
    assert c_tokens == _solo(model, cancelled[0], cancelled[1])[0][:4]


def test_adding_to_an_empty_decoder_and_after_it_emptied(model_and_processor, new_decoder):
    model, processor = model_and_processor
    decoder = new_decoder(model)
    assert not decoder.has_rows and decoder.step() == []
    first = (_prompt(processor, "hello"), {**GREEDY_SPEECH, "max_new_tokens": 5})
    text_only = (_prompt(processor, "good morning there", speech=False), {**TEXT_ONLY, "max_new_tokens": 6})
    spoken = (_prompt(processor, "hello", audio_seconds=0.5), {**GREEDY_SPEECH, "max_new_tokens": 7})
    results, _ = _run(decoder, {0: [("first", *first)]})
    assert not decoder.has_rows and len(decoder) == 0
    # Again from empty: a text-only batch (no speech head state at all) that a spoken row then joins.
    later, _ = _run(decoder, {0: [("text", *text_only)], 1: [("spoken", *spoken)]})
    _assert_equal_solo(model, {**results, **later}, {"first": first, "text": text_only, "spoken": spoken})


def test_one_sampled_row_draws_what_seeded_generate_draws(model_and_processor, new_decoder):
    """Alone, a sampled row consumes the RNG in generate's order (SRH codes, then the text token)."""
    model, processor = model_and_processor
    inputs = _prompt(processor, "hello there")
    settings = {"do_sample": True, "temperature": 0.9, "top_p": 0.95, "force_audio_bos": True, "max_new_tokens": 8}
    torch.manual_seed(7)
    solo_tokens, solo_codes = _solo(model, inputs, settings)
    torch.manual_seed(7)
    results, _ = _run(new_decoder(model), {0: [("row", inputs, settings)]})
    assert results["row"][0] == solo_tokens and results["row"][1] == solo_codes


def test_seeded_sampled_rows_in_a_staggered_batch_draw_what_seeded_generate_draws(model_and_processor, new_decoder):
    """Each seeded row samples from its own stream: neither the greedy row, nor the unseeded sampled row drawing
    from the global stream, nor the order of arrival changes its reply."""
    model, processor = model_and_processor
    sampled = {"do_sample": True, "force_audio_bos": True, "max_new_tokens": 7}
    seeded = {
        "B": (_prompt(processor, "good morning", audio_seconds=0.5), {**sampled, "temperature": 0.9}, 11),
        "C": (_prompt(processor, "thank you"), {**sampled, "temperature": 1.3, "speech_top_k": 20}, 12),
    }
    greedy = (_prompt(processor, "hello there"), {**GREEDY_SPEECH, "max_new_tokens": 9})
    unseeded = (_prompt(processor, "city"), {**sampled, "temperature": 1.1})
    arrivals = {
        0: [("A", *greedy), ("D", *unseeded)],
        2: [("B", seeded["B"][0], {**seeded["B"][1], "seed": seeded["B"][2]})],
        3: [("C", seeded["C"][0], {**seeded["C"][1], "seed": seeded["C"][2]})],
    }
    results, _ = _run(new_decoder(model), arrivals)
    _assert_equal_solo(model, results, {"A": greedy})
    for name, (inputs, settings, seed) in seeded.items():
        torch.manual_seed(seed)
        tokens, codes = _solo(model, inputs, settings)
        assert results[name][0] == tokens and results[name][1] == codes, f"{name} differs from seeded generate()"
    assert len(results["D"][0]) == 7


def test_steps_describe_each_row(model_and_processor, new_decoder):
    model, processor = model_and_processor
    decoder = new_decoder(model)
    row = decoder.add(_prompt(processor, "hello"), **GREEDY_SPEECH, max_new_tokens=2)
    assert decoder.row_ids == [row]
    (first,) = decoder.step()
    assert isinstance(first, RowStep) and first.row_id == row and not first.finished
    assert first.token_id == model.config.text_config.audio_bos_index
    assert first.speech_group is None  # the row starts speaking with the group after <|audio_bos|>
    (second,) = decoder.step()
    assert second.finished and second.finish_reason == "length"
    assert second.speech_group is not None and second.speech_group.shape == (model.group_size,)


def test_cancelling_a_waiting_row_and_the_last_row(model_and_processor, new_decoder):
    model, processor = model_and_processor
    decoder = new_decoder(model)
    kept = decoder.add(_prompt(processor, "hello"), **GREEDY_SPEECH, max_new_tokens=4)
    dropped = decoder.add(_prompt(processor, "good morning"), **GREEDY_SPEECH, max_new_tokens=4)
    decoder.cancel(dropped)  # before it ever joined the batch
    assert [step.row_id for step in decoder.step()] == [kept]
    assert decoder.row_ids == [kept]
    decoder.cancel(kept)
    assert decoder.step() == [] and not decoder.has_rows


def test_bad_requests_fail_in_add_and_leave_the_batch_alone(model_and_processor, new_decoder):
    model, processor = model_and_processor
    decoder = new_decoder(model)
    decoder.add(_prompt(processor, "hello"), **GREEDY_SPEECH, max_new_tokens=3)
    two_rows = _prompt(processor, "hello")
    two_rows = {key: torch.cat([value, value]) for key, value in two_rows.items()}
    with pytest.raises(ValueError, match="one prompt"):
        decoder.add(two_rows, **GREEDY_SPEECH, max_new_tokens=3)
    with pytest.raises(ValueError, match="not generation settings"):
        decoder.add(_prompt(processor, "hello"), max_new_tokens=3, not_a_setting=1)
    with pytest.raises(ValueError, match="greedy decoding and sampling only"):
        decoder.add(_prompt(processor, "hello"), max_new_tokens=3, num_beams=2)
    assert len(decoder) == 1
    steps = [decoder.step() for _ in range(3)]
    assert [len(step) for step in steps] == [1, 1, 1] and steps[-1][0].finished
