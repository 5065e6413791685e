"""generate(): exact at batch 1 against the official oracle, row-exact in padded batches, no hidden state."""

import threading

import pytest
import torch
from torch import nn

from fun_audio_chat import FunAudioChatIteratorStreamer, SpeechEvent, TextEvent

from . import oracle

GEN_CASES = ["gen_force_abos_b1", "gen_no_force_b1", "gen_s2t_b1", "gen_speech_eos_b1"]
ATOL = 1e-4
# The oracle ran greedy text and greedy SRH codes with no speech processors.
GREEDY_SPEECH = {"speech_do_sample": False, "speech_repetition_penalty": 1.0}


def _case_kwargs(case):
    meta = oracle.meta(case)
    all_inputs = oracle.inputs(case)
    inputs = {key: all_inputs[key] for key in meta["input_keys"]}
    controls = {
        **meta["GEN"],
        **GREEDY_SPEECH,
        "return_speech": not meta["SP"]["disable_speech"],
        "force_audio_bos": meta["SP"]["force_text_abos"],
    }
    return inputs, controls, meta


class CallCounter:
    """Counts the speech head's logits computations (its output table is also called for code embeddings)."""

    def __init__(self, module: nn.Module):
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        if kwargs.get("codes") is None:
            self.calls += 1

    def remove(self):
        self.handle.remove()


@pytest.mark.parametrize("case", GEN_CASES)
def test_generation_matches_official_batch1(case):
    model = oracle.load_model(case)
    inputs, controls, meta = _case_kwargs(case)
    reference = oracle.outputs(case)
    counter = CallCounter(model.audio_invert_tower.lm_head)
    try:
        out = model.generate(**inputs, **controls, return_dict_in_generate=True, output_logits=True)
    finally:
        counter.remove()

    assert torch.equal(out.sequences, reference["sequences"])
    step_logits = torch.stack(out.logits)
    assert step_logits.shape == reference["step_text_logits"].shape
    assert (step_logits - reference["step_text_logits"]).abs().max() < ATOL
    if controls["return_speech"]:
        assert torch.equal(out.speech_ids, reference["speech_ids"])
        assert out.speech_attention_mask.sum().item() == reference["speech_ids"].shape[1]
        srh_logits = torch.stack(out.speech_logits)
        assert (srh_logits - reference["step_crq_last_logits"]).abs().max() < ATOL
        assert counter.calls == meta["n_crq_lm_head_calls"]
    else:
        assert counter.calls == 0, "speech-to-text must never run the Speech Refined Head"
        assert not hasattr(out, "speech_ids") or out.speech_ids is None


def test_default_return_is_official_tuple():
    model = oracle.load_model("gen_speech_eos_b1")
    inputs, controls, _ = _case_kwargs("gen_speech_eos_b1")
    sequences, speech_ids = model.generate(**inputs, **controls)
    reference = oracle.outputs("gen_speech_eos_b1")
    assert torch.equal(sequences, reference["sequences"])
    assert torch.equal(speech_ids, reference["speech_ids"])


def test_speech_to_text_returns_plain_sequences():
    model = oracle.load_model("gen_s2t_b1")
    inputs, controls, _ = _case_kwargs("gen_s2t_b1")
    sequences = model.generate(**inputs, **controls)
    assert torch.equal(sequences, oracle.outputs("gen_s2t_b1")["sequences"])


# ----------------------------------------------------------------------------------------- batches
def _rows_of(case):
    """Per-row solo inputs (1-D prompt without padding + that row's audio tensors) of a left-padded case."""
    meta = oracle.meta(case)
    all_inputs = oracle.inputs(case)
    rows = []
    for r in range(all_inputs["input_ids"].shape[0]):
        keep = all_inputs["attention_mask"][r].bool()
        rows.append(
            {
                "input_ids": all_inputs["input_ids"][r][keep],
                "speech_ids": all_inputs["speech_ids"][r : r + 1],
                "speech_attention_mask": all_inputs["speech_attention_mask"][r : r + 1],
                "input_features": all_inputs["input_features"][r : r + 1],
                "feature_attention_mask": all_inputs["feature_attention_mask"][r : r + 1],
                "feature_exist_mask": all_inputs["feature_exist_mask"][r : r + 1],
            }
        )
    return rows, meta


def _batch(rows, pad_id=500):
    longest = max(len(row["input_ids"]) for row in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[r, longest - n :] = row["input_ids"]
        mask[r, longest - n :] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    for key in (
        "speech_ids",
        "speech_attention_mask",
        "input_features",
        "feature_attention_mask",
        "feature_exist_mask",
    ):
        batch[key] = torch.cat([row[key] for row in rows])
    return batch


def _solo(row):
    solo = dict(row)
    solo["input_ids"] = row["input_ids"][None]
    solo["attention_mask"] = torch.ones_like(solo["input_ids"])
    return solo


def _assert_rows_equal_solo(model, rows, controls):
    batch = _batch(rows)
    prompt_len = batch["input_ids"].shape[1]
    batched = model.generate(**batch, **controls, return_dict_in_generate=True)
    results = []
    for r, row in enumerate(rows):
        alone = model.generate(**_solo(row), **controls, return_dict_in_generate=True)
        new_alone = alone.sequences[0, len(row["input_ids"]) :]
        new_batched = batched.sequences[r, prompt_len:]
        assert torch.equal(new_batched[: len(new_alone)], new_alone), f"row {r} text differs from its solo run"
        # Past the solo run's end, the batched row only holds padding.
        assert bool((new_batched[len(new_alone) :] == controls["pad_token_id"]).all())
        speech_batched = batched.speech_ids[r][batched.speech_attention_mask[r].bool()]
        assert torch.equal(speech_batched, alone.speech_ids[0]), f"row {r} speech differs from its solo run"
        results.append((new_alone, alone.speech_ids[0]))
    return batched, results


def test_left_padded_batch_rows_equal_recorded_solo_runs():
    """The official batched output is wrong for the padded row (SPEC Q4); ours equals each solo run."""
    model = oracle.load_model("gen_force_abos_b2_leftpad")
    inputs, controls, meta = _case_kwargs("gen_force_abos_b2_leftpad")
    out = model.generate(**inputs, **controls, return_dict_in_generate=True)
    prompt_len = meta["prompt_len"]
    for r, alone in enumerate(meta["per_sample_alone_vs_batched"]):
        assert out.sequences[r, prompt_len:].tolist() == alone["alone_generated_text_ids"]
        speech = out.speech_ids[r][out.speech_attention_mask[r].bool()].tolist()
        assert speech == alone["alone_speech_ids"]
    assert not meta["per_sample_alone_vs_batched"][0]["speech_matches_batched"], "fixture sanity: official is wrong"


def test_rows_stop_speaking_and_finish_at_different_steps():
    """Model B: speech-EOS then text EOS; the two prompts reach them at different steps."""
    model = oracle.load_model("gen_speech_eos_b1")
    rows, _ = _rows_of("gen_force_abos_b2_leftpad")
    controls = {
        "max_new_tokens": 30,
        "do_sample": False,
        "eos_token_id": 502,
        "pad_token_id": 500,
        "force_audio_bos": True,
        **GREEDY_SPEECH,
    }
    batched, results = _assert_rows_equal_solo(model, rows, controls)
    lengths = [len(text) for text, _ in results]
    speech_lengths = [len(speech) for _, speech in results]
    assert 504 in results[0][0].tolist(), "row 0 should end its speech with <|audio_eos|>"
    assert lengths[0] != lengths[1] or speech_lengths[0] != speech_lengths[1], "scenario must diverge per row"


def test_rows_start_speaking_at_different_steps():
    """Row 0's prompt already opens the reply with <|audio_bos|> (speaks from the first step); row 1 does not."""
    model = oracle.load_model("gen_speech_eos_b1")
    rows, _ = _rows_of("gen_force_abos_b2_leftpad")
    rows[0]["input_ids"] = torch.cat([rows[0]["input_ids"], torch.tensor([503])])
    controls = {
        "max_new_tokens": 24,
        "do_sample": False,
        "eos_token_id": 502,
        "pad_token_id": 500,
        "force_audio_bos": False,
        **GREEDY_SPEECH,
    }
    _, results = _assert_rows_equal_solo(model, rows, controls)
    assert len(results[0][1]) > 0
    assert len(results[0][1]) != len(results[1][1])


def test_sampled_speech_settings_are_used_and_seeded():
    model = oracle.load_model("gen_force_abos_b1")
    inputs, controls, _ = _case_kwargs("gen_force_abos_b1")
    controls = {
        **controls,
        "max_new_tokens": 12,
        "speech_do_sample": True,
        "speech_temperature": 1.5,
        "speech_repetition_penalty": 1.2,
    }
    torch.manual_seed(3)
    first = model.generate(**inputs, **controls)
    torch.manual_seed(3)
    again = model.generate(**inputs, **controls)
    greedy = model.generate(**inputs, **{**controls, **GREEDY_SPEECH})
    assert torch.equal(first[1], again[1])
    assert not torch.equal(first[1], greedy[1])
    # Text stays greedy: only speech codes are sampled, and the forced <|audio_bos|> opens the reply.
    assert first[0][0, inputs["input_ids"].shape[1]].item() == 503


# ------------------------------------------------------------------------------------- no hidden state
def test_forward_after_generate_is_unchanged_and_inputs_are_not_mutated():
    model = oracle.load_model("train_b1")
    model.config.halve_unpaired_audio_features = True
    try:
        train_inputs = oracle.variant_inputs("train_b1", "with_labels")
        snapshot = {k: v.clone() for k, v in train_inputs.items()}
        with torch.no_grad():
            before = model(**train_inputs)
            gen_inputs, controls, _ = _case_kwargs("gen_force_abos_b1")
            gen_snapshot = {k: v.clone() for k, v in gen_inputs.items()}
            model.generate(**gen_inputs, **{**controls, "max_new_tokens": 8})
            after = model(**train_inputs)
    finally:
        model.config.halve_unpaired_audio_features = False
    assert torch.equal(before.speech_logits, after.speech_logits)
    assert torch.equal(before.logits, after.logits)
    assert before.loss.item() == after.loss.item()
    for key, value in train_inputs.items():
        assert torch.equal(value, snapshot[key]), f"forward mutated {key}"
    for key, value in gen_inputs.items():
        assert torch.equal(value, gen_snapshot[key]), f"generate mutated {key}"


def test_two_generations_interleaved_in_threads_give_solo_results():
    model = oracle.load_model("gen_force_abos_b1")
    rows, _ = _rows_of("gen_force_abos_b2_leftpad")
    controls = {
        "max_new_tokens": 12,
        "do_sample": False,
        "eos_token_id": 502,
        "pad_token_id": 500,
        "force_audio_bos": True,
        **GREEDY_SPEECH,
    }
    solo = [model.generate(**_solo(row), **controls) for row in rows]
    barrier = threading.Barrier(2)

    class Lockstep:
        """Makes the two generate loops alternate steps."""

        def put(self, value):
            barrier.wait(timeout=30)

        def end(self):
            pass

    results = [None, None]

    def run(i):
        results[i] = model.generate(**_solo(rows[i]), **controls, streamer=Lockstep())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for i in range(2):
        assert torch.equal(results[i][0], solo[i][0])
        assert torch.equal(results[i][1], solo[i][1])


# ------------------------------------------------------------------------------------------- streaming
def test_streamer_events_reassemble_the_returned_outputs():
    model = oracle.load_model("gen_speech_eos_b1")
    rows, _ = _rows_of("gen_force_abos_b2_leftpad")
    batch = _batch(rows)
    controls = {
        "max_new_tokens": 20,
        "do_sample": False,
        "eos_token_id": 502,
        "pad_token_id": 500,
        "force_audio_bos": True,
        **GREEDY_SPEECH,
    }
    streamer = FunAudioChatIteratorStreamer(timeout=120)
    events_seen = []
    holder = {}

    def run():
        try:
            holder["out"] = model.generate(**batch, **controls, streamer=streamer, return_dict_in_generate=True)
        finally:
            streamer.end()

    thread = threading.Thread(target=run)
    thread.start()
    for event in streamer:
        events_seen.append(event)
    thread.join()
    out = holder["out"]
    prompt_len = batch["input_ids"].shape[1]
    for r in range(2):
        text = [e.token_id for e in events_seen if isinstance(e, TextEvent) and e.row == r]
        speech = [c for e in events_seen if isinstance(e, SpeechEvent) and e.row == r for c in e.codes]
        assert text == out.sequences[r, prompt_len:].tolist()
        assert speech == out.speech_ids[r][out.speech_attention_mask[r].bool()].tolist()
    # The first speech group arrives right after the first speaking step (step 1), interleaved with text.
    first_speech = next(i for i, e in enumerate(events_seen) if isinstance(e, SpeechEvent))
    text_before = sum(isinstance(e, TextEvent) for e in events_seen[:first_speech])
    assert text_before == 2 * 2  # two steps of two rows' text tokens


def test_static_cache_generation_matches_dynamic():
    model = oracle.load_model("gen_force_abos_b1")
    inputs, controls, _ = _case_kwargs("gen_force_abos_b1")
    controls = {**controls, "max_new_tokens": 10}
    dynamic = model.generate(**inputs, **controls)
    static = model.generate(**inputs, **controls, cache_implementation="static")
    assert torch.equal(dynamic[0], static[0])
    assert torch.equal(dynamic[1], static[1])


def test_generation_config_round_trip_keeps_speech_controls(tmp_path):
    from transformers import GenerationConfig

    from fun_audio_chat import FunAudioChatForConditionalGeneration

    model = FunAudioChatForConditionalGeneration.from_pretrained(oracle.checkpoint_dir("gen_force_abos_b1"))
    # Loaded from an official generation_config.json: the speech fields take the official S2S defaults.
    assert model.generation_config.speech_temperature == 0.8
    model.generation_config.speech_temperature = 0.6
    model.generation_config.force_audio_bos = True
    model.save_pretrained(tmp_path)
    loaded = GenerationConfig.from_pretrained(tmp_path)
    assert loaded.speech_temperature == 0.6 and loaded.force_audio_bos is True
    assert loaded.speech_top_p == 0.9 and loaded.speech_repetition_penalty == 1.2
    reloaded = FunAudioChatForConditionalGeneration.from_pretrained(tmp_path)
    assert reloaded.generation_config.speech_temperature == 0.6


def test_model_without_head_generates_text_by_default_and_refuses_speech():
    from fun_audio_chat import FunAudioChatForConditionalGeneration
    from fun_audio_chat.tiny import tiny_config

    model = FunAudioChatForConditionalGeneration(tiny_config(audio_config={"enable_audio_invert_tower": False}))
    assert model.generation_config.return_speech is False
    out = model.generate(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=2)
    assert out.shape == (1, 5)
    with pytest.raises(ValueError, match="return_speech=False"):
        model.generate(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=2, return_speech=True)


def test_speech_repetition_penalty_follows_transformers_rule_over_reply_codes():
    """Each greedy code equals argmax of RepetitionPenaltyLogitsProcessor applied to the raw SRH logits over
    the reply's committed codes plus the codes already drawn in the current group (the official context)."""
    from transformers.generation import RepetitionPenaltyLogitsProcessor

    model = oracle.load_model("gen_force_abos_b1")
    inputs, controls, _ = _case_kwargs("gen_force_abos_b1")
    controls = {**controls, "max_new_tokens": 10, "speech_repetition_penalty": 1.3}
    out = model.generate(**inputs, **controls, return_dict_in_generate=True, output_logits=True)
    penalty = RepetitionPenaltyLogitsProcessor(1.3)
    k = model.group_size
    committed: list[int] = []
    raw = out.speech_logits
    for step in range(len(raw) // k):
        group = []
        for sub in range(k):
            context = torch.tensor([committed + group])
            scores = penalty(context, raw[step * k + sub].clone()) if context.numel() else raw[step * k + sub]
            group.append(int(scores.argmax(-1)))
        if step >= 1:  # forced <|audio_bos|> at step 0: every later group belongs to the reply
            committed.extend(group)
    assert out.speech_ids[0].tolist() == committed
    greedy = model.generate(**inputs, **{**controls, "speech_repetition_penalty": 1.0})
    assert not torch.equal(greedy[1], out.speech_ids), "penalty must change this reply's codes"


@pytest.mark.parametrize("static", [False, True])
def test_speech_head_decoder_step_equals_the_backbone_forward(static):
    """The SRH decoder's step (transformers' Qwen3 layers with precomputed rotary and mask, on the preallocated or
    the static cache) computes what ``crq_transformer.forward`` computes for that position, padded or not."""
    from transformers.cache_utils import DynamicCache

    from fun_audio_chat.modeling.speech_head import SpeechHeadDecoder

    model = oracle.load_model("gen_force_abos_b1")
    head = model.audio_invert_tower
    torch.manual_seed(0)
    prompt, step = torch.randn(2, 7, 64), torch.randn(2, 1, 64)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    positions = (torch.arange(8)[None, :] - (8 - mask.sum(-1))[:, None]).clamp(min=0)
    with torch.no_grad():
        reference_cache = DynamicCache()
        _, reference_prompt = head.run_backbone(
            prompt, mask[:, :7], positions[:, :7], past_key_values=reference_cache, use_cache=True
        )
        _, reference = head.run_backbone(step, mask, positions[:, 7:], past_key_values=reference_cache, use_cache=True)
        capacity = 16
        layout_positions = torch.cat([positions, positions[:, -1:] + torch.arange(1, 9)], dim=1)
        layout_mask = torch.cat([mask, torch.ones(2, 8, dtype=torch.long)], dim=1)
        decoder = SpeechHeadDecoder(head, layout_positions, layout_mask, static=static)
        assert decoder.capacity == capacity
        found_prompt = decoder.prefill(prompt)
        found = decoder.step(step)
    real = mask[:, :7, None].bool()  # padded queries' logits are never used
    torch.testing.assert_close(found_prompt * real, reference_prompt * real, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(found, reference[:, -1], atol=1e-5, rtol=1e-5)
    assert decoder.length == 8


def test_over_long_context_is_a_clear_error():
    model = oracle.load_model("gen_force_abos_b1")
    inputs, controls, _ = _case_kwargs("gen_force_abos_b1")
    with pytest.raises(ValueError, match="Speech Refined Head would need"):
        model.generate(**inputs, **{**controls, "max_new_tokens": 900})  # 5 x 930 > 4096 SRH positions
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(**inputs, **{**controls, "max_new_tokens": 1000, "return_speech": False})


def test_eager_attention_generation_matches_the_oracle():
    """The oracle records that a correct eager implementation generates the same tokens as SDPA."""
    model = oracle.load_model("gen_force_abos_b1", attn="eager")
    assert model.audio_invert_tower.crq_transformer.config._attn_implementation == "eager"
    inputs, controls, meta = _case_kwargs("gen_force_abos_b1")
    assert meta["eager_fixed_generation_identical"]
    reference = oracle.outputs("gen_force_abos_b1")
    sequences, speech_ids = model.generate(**inputs, **controls)
    assert torch.equal(sequences, reference["sequences"])
    assert torch.equal(speech_ids, reference["speech_ids"])
