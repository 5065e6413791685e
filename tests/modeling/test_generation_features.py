"""generate() on transformers' extension points: cache continuation, output states, inputs_embeds, offload, quantized
LLM, compiled decoding, synced GPUs, and clear refusals of what is unsupported or malformed."""

import copy
import threading

import pytest
import torch

from fun_audio_chat import FunAudioChatForConditionalGeneration, FunAudioChatIteratorStreamer
from fun_audio_chat.transformers_compat import CACHE_NAME

from .model_tester import AUDIO, AUDIO_BOS, AUDIO_EOS, IM_END, IM_START, PAD, FunAudioChatModelTester

GREEDY = {
    "do_sample": False,
    "speech_do_sample": False,
    "speech_repetition_penalty": 1.0,
    "eos_token_id": 502,
    "pad_token_id": 500,
}


@pytest.fixture(scope="module")
def tester():
    return FunAudioChatModelTester()


@pytest.fixture(scope="module")
def model_and_inputs(tester):
    config, inputs = tester.prepare_config_and_inputs()
    return tester.create_model(config), inputs


def _text_prompt():
    return torch.tensor([[501, 10, 101, 102, 502, 501, 11, 120, 121, 122, 502, 501, 12]])


# ------------------------------------------------------------------------------------------ continuation
def test_continuing_from_a_returned_cache_equals_the_one_shot_run(model_and_inputs):
    model, inputs = model_and_inputs
    controls = {**GREEDY, "return_speech": False}
    with torch.no_grad():
        whole = model.generate(
            **inputs, **controls, max_new_tokens=10, min_new_tokens=10, return_dict_in_generate=True, output_logits=True
        )
        first = model.generate(**inputs, **controls, max_new_tokens=4, min_new_tokens=4, return_dict_in_generate=True)
        prompt_length = first.sequences.shape[1]
        cache = first.past_key_values
        assert cache.get_seq_length() == prompt_length - 1
        rest = model.generate(
            input_ids=first.sequences,
            attention_mask=torch.cat([inputs["attention_mask"], torch.ones(2, 4, dtype=torch.long)], dim=1),
            **{CACHE_NAME: cache},  # past_key_values= up to transformers 5.23, cache= from 5.24
            max_new_tokens=6,
            return_dict_in_generate=True,
            output_logits=True,
            min_new_tokens=6,
            **controls,
        )
    # Only the one new position ran on top of the cache.
    assert cache.get_seq_length() == whole.sequences.shape[1] - 1
    assert torch.equal(rest.sequences, whole.sequences)
    torch.testing.assert_close(torch.stack(rest.logits), torch.stack(whole.logits)[4:], atol=1e-4, rtol=1e-4)


def test_continuing_a_text_reply_from_inputs_embeds_and_its_cache_equals_the_one_shot_run(model_and_inputs):
    """The context check counts a prompt given as embeddings (it read the empty input_ids and refused the call)."""
    model, _ = model_and_inputs
    embed = model.get_input_embeddings()
    prompt = embed(_text_prompt())
    controls = {**GREEDY, "return_speech": False, "return_dict_in_generate": True, "eos_token_id": -1}
    with torch.no_grad():
        whole = model.generate(inputs_embeds=prompt, max_new_tokens=4, **controls)
        first = model.generate(inputs_embeds=prompt, max_new_tokens=3, **controls)
        rest = model.generate(
            inputs_embeds=torch.cat([prompt, embed(first.sequences)], dim=1),
            max_new_tokens=1,
            **{CACHE_NAME: first.past_key_values},
            **controls,
        )
    assert torch.equal(torch.cat([first.sequences, rest.sequences], dim=1), whole.sequences)


# ---------------------------------------------------------------------------------------- output states
def test_generate_returns_hidden_states_and_attentions_when_asked(tester):
    config, inputs = tester.prepare_config_and_inputs()
    model = tester.create_model(config, attn_implementation="eager")
    with torch.no_grad():
        out = model.generate(
            **inputs,
            **GREEDY,
            max_new_tokens=3,
            min_new_tokens=3,
            force_audio_bos=True,
            output_hidden_states=True,
            output_attentions=True,
            return_dict_in_generate=True,
        )
    layers = config.text_config.num_hidden_layers
    prompt = inputs["input_ids"].shape[1]
    assert len(out.hidden_states) == 3 and len(out.attentions) == 3
    assert len(out.hidden_states[0]) == layers + 1 and out.hidden_states[0][-1].shape == (2, prompt, 64)
    assert out.hidden_states[1][-1].shape == (2, 1, 64)
    assert len(out.attentions[1]) == layers and out.attentions[1][0].shape == (2, 4, 1, prompt + 1)
    assert out.speech_ids is not None


def test_forward_follows_the_config_output_flags(model_and_inputs):
    model, inputs = model_and_inputs
    with torch.no_grad():
        assert model(**inputs).hidden_states is None
        model.config.output_hidden_states = True
        try:
            states = model(**inputs).hidden_states
        finally:
            model.config.output_hidden_states = False
        assert states is not None and len(states) == model.config.text_config.num_hidden_layers + 1
        assert model(**inputs, output_hidden_states=True).hidden_states is not None


# ------------------------------------------------------------------------------------- expanded batches
def _two_audios_then_none(tester, inputs):
    """Row 0 holds both of the tester's audios, row 1 none: the audio tensors have one row per audio, not per
    batch row, so repeating each audio row for ``num_return_sequences`` would give row 0's copies the wrong audio."""
    placeholders = [-(-frames // tester.group_size) for frames in tester.audio_frames]
    spoken = [IM_START, 11]
    for count in placeholders:
        spoken += [AUDIO_BOS] + [AUDIO] * count + [AUDIO_EOS]
    spoken += [IM_END, IM_START, 12]
    silent = _text_prompt()[0].tolist()
    width = max(len(spoken), len(silent))
    input_ids = torch.full((2, width), PAD, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate((spoken, silent)):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    return {**inputs, "input_ids": input_ids, "attention_mask": attention_mask}


@pytest.mark.parametrize("return_speech", [False, True])
def test_num_return_sequences_copies_each_row_with_its_own_audios(tester, model_and_inputs, return_speech):
    model, inputs = model_and_inputs
    batch = _two_audios_then_none(tester, inputs)
    # (sampling from the single best token: greedy decoding refuses num_return_sequences > 1)
    controls = {**GREEDY, "do_sample": True, "top_k": 1, "max_new_tokens": 5, "min_new_tokens": 5}
    controls.update(return_speech=return_speech, force_audio_bos=return_speech, return_dict_in_generate=True)
    with torch.no_grad():
        single = model.generate(**batch, **controls)
        copies = model.generate(**batch, **controls, num_return_sequences=2)
    assert torch.equal(copies.sequences, single.sequences.repeat_interleave(2, dim=0))
    if return_speech:
        assert single.speech_attention_mask.sum() > 0
        assert torch.equal(copies.speech_ids, single.speech_ids.repeat_interleave(2, dim=0))


def test_text_reply_beam_search_gives_each_row_the_beams_of_its_own_prompt(tester, model_and_inputs):
    """A text reply may use transformers' beam search; each row's beams see that row's audios (two, or none)."""
    model, inputs = model_and_inputs
    batch = _two_audios_then_none(tester, inputs)
    controls = {**GREEDY, "return_speech": False, "num_beams": 3, "max_new_tokens": 4, "min_new_tokens": 4}
    with torch.no_grad():
        together = model.generate(**batch, **controls)
        spoken = {**batch, "input_ids": batch["input_ids"][:1], "attention_mask": batch["attention_mask"][:1]}
        spoken_alone = model.generate(**spoken, **controls)
        silent = batch["input_ids"][1:, batch["attention_mask"][1].argmax() :]
        silent_alone = model.generate(input_ids=silent, **controls)
    assert together.shape == (2, batch["input_ids"].shape[1] + 4)
    assert torch.equal(together[0], spoken_alone[0])
    assert torch.equal(together[1, -4:], silent_alone[0, -4:])


def test_text_reply_assisted_decoding_equals_greedy_with_an_audio_prompt(tester, model_and_inputs):
    """Assisted decoding feeds several candidate tokens per step; the prompt's audio reaches only the prefill."""
    model, inputs = model_and_inputs
    single = {name: value[:1] for name, value in inputs.items()}
    controls = {**GREEDY, "return_speech": False, "max_new_tokens": 6, "min_new_tokens": 6}
    with torch.no_grad():
        greedy = model.generate(**single, **controls)
        assisted = model.generate(**single, **controls, assistant_model=model)
        looked_up = model.generate(**single, **controls, prompt_lookup_num_tokens=2)
    assert torch.equal(assisted, greedy) and torch.equal(looked_up, greedy)


def test_text_reply_without_a_cache_equals_the_cached_run(model_and_inputs):
    """use_cache=False is honoured by a text reply (every step reruns the whole sequence, audio included)."""
    model, inputs = model_and_inputs
    controls = {**GREEDY, "return_speech": False, "max_new_tokens": 4, "min_new_tokens": 4}
    controls.update(return_dict_in_generate=True, output_hidden_states=True)
    with torch.no_grad():
        cached = model.generate(**inputs, **controls)
        uncached = model.generate(**inputs, **controls, use_cache=False)
    assert torch.equal(uncached.sequences, cached.sequences)
    assert uncached.past_key_values is None
    prompt = inputs["input_ids"].shape[1]
    assert [step[-1].shape[1] for step in uncached.hidden_states] == [prompt, prompt + 1, prompt + 2, prompt + 3]


# ---------------------------------------------------------------------------------------- inputs_embeds
def test_speech_generation_from_inputs_embeds_alone_equals_input_ids(model_and_inputs):
    model, _ = model_and_inputs
    ids = torch.cat([_text_prompt(), torch.tensor([[AUDIO_BOS]])], dim=1)  # the prompt opens the spoken reply
    controls = {**GREEDY, "max_new_tokens": 6, "min_new_tokens": 6, "return_dict_in_generate": True}
    with torch.no_grad():
        from_ids = model.generate(input_ids=ids, **controls)
        from_embeds = model.generate(inputs_embeds=model.get_input_embeddings()(ids), **controls)
    assert torch.equal(from_embeds.sequences, from_ids.sequences[:, ids.shape[1] :])
    assert from_ids.speech_attention_mask.sum() > 0
    assert torch.equal(from_embeds.speech_ids, from_ids.speech_ids)


@pytest.mark.parametrize("return_speech", [False, True])
def test_audio_prompt_given_as_embeddings_equals_the_same_prompt_as_ids(model_and_inputs, return_speech):
    """transformers' multimodal contract: ``inputs_embeds`` of the prompt plus its audio inputs; the audio fills the
    positions holding the <|AUDIO|> embedding (it was silently dropped before)."""
    model, inputs = model_and_inputs
    audio = {name: value for name, value in inputs.items() if name not in ("input_ids", "attention_mask")}
    controls = {**GREEDY, "max_new_tokens": 5, "min_new_tokens": 5, "return_dict_in_generate": True}
    controls.update(return_speech=return_speech, force_audio_bos=return_speech)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with torch.no_grad():
        from_ids = model.generate(**inputs, **controls)
        from_embeds = model.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], **audio, **controls)
        without_audio = model.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], **controls)
    prompt = inputs["input_ids"].shape[1]
    assert torch.equal(from_embeds.sequences, from_ids.sequences[:, prompt:])
    assert not torch.equal(without_audio.sequences, from_embeds.sequences)  # the audio does reach the model
    if return_speech:
        assert from_ids.speech_attention_mask.sum() > 0
        assert torch.equal(from_embeds.speech_ids, from_ids.speech_ids)


# --------------------------------------------------------------------------------------------- no head
def test_model_without_speech_head_generates_text_with_its_defaults(tester):
    model = tester.create_model(tester.get_config(audio_config={"enable_audio_invert_tower": False}))
    _, inputs = tester.prepare_config_and_inputs()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, pad_token_id=500)
    assert torch.is_tensor(out) and out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_generation_mode_selects_the_reply_modality_as_the_any_to_any_pipeline_asks(tester, model_and_inputs):
    model, inputs = model_and_inputs
    with torch.no_grad():
        text = model.generate(**inputs, **GREEDY, max_new_tokens=3, generation_mode="text")
        spoken = model.generate(**inputs, **GREEDY, max_new_tokens=3, generation_mode="audio")
        spoken_reference = model.generate(**inputs, **GREEDY, max_new_tokens=3, return_speech=True)
    assert torch.is_tensor(text) and text.shape[1] == inputs["input_ids"].shape[1] + 3
    assert isinstance(spoken, tuple) and all(torch.equal(a, b) for a, b in zip(spoken, spoken_reference))
    with pytest.raises(ValueError, match="use 'text'"):
        model.generate(**inputs, max_new_tokens=2, generation_mode="image")
    with pytest.raises(ValueError, match="contradicts return_speech"):
        model.generate(**inputs, max_new_tokens=2, generation_mode="text", return_speech=True)
    textual = tester.create_model(tester.get_config(audio_config={"enable_audio_invert_tower": False}))
    with pytest.raises(ValueError, match="generation_mode='text'"):
        textual.generate(**inputs, max_new_tokens=2, generation_mode="audio")


def test_unused_audio_boundary_table_is_frozen(tester, model_and_inputs, tmp_path):
    model, _ = model_and_inputs
    assert not model.continuous_audio_tower.audio_bos_eos_token.weight.requires_grad
    model.save_pretrained(tmp_path)
    loaded = FunAudioChatForConditionalGeneration.from_pretrained(tmp_path)
    table = loaded.continuous_audio_tower.audio_bos_eos_token.weight
    assert not table.requires_grad
    assert torch.equal(table, model.continuous_audio_tower.audio_bos_eos_token.weight)


def test_no_split_modules_name_classes_of_the_model(model_and_inputs):
    model, _ = model_and_inputs
    present = {type(module).__name__ for module in model.modules()}
    assert set(model._no_split_modules) <= present


# ---------------------------------------------------------------------------- offload and quantization
def test_generate_with_cpu_and_disk_offload_equals_in_memory(model_and_inputs, tmp_path):
    model, inputs = model_and_inputs
    model.save_pretrained(tmp_path / "model")
    device_map = {
        "continuous_audio_tower": "cpu",
        "audio_tower": "cpu",
        "audio_invert_tower.pre_matching": "cpu",
        "audio_invert_tower.input_matching": "cpu",
        "audio_invert_tower.output_matching": "disk",
        "audio_invert_tower.lm_head": "cpu",
        "audio_invert_tower.crq_transformer.layers.0": "cpu",
        "audio_invert_tower.crq_transformer.layers.1": "disk",
        "audio_invert_tower.crq_transformer.norm": "cpu",
        "audio_invert_tower.crq_transformer.rotary_emb": "cpu",
        "language_model.model.embed_tokens": "cpu",
        "language_model.model.layers.0": "disk",
        "language_model.model.layers.1": "cpu",
        "language_model.model.norm": "cpu",
        "language_model.model.rotary_emb": "cpu",
        "language_model.lm_head": "disk",
    }
    offloaded = FunAudioChatForConditionalGeneration.from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=tmp_path / "offload"
    )
    assert "disk" in set(offloaded.hf_device_map.values())
    controls = {**GREEDY, "max_new_tokens": 5, "force_audio_bos": True}
    with torch.no_grad():
        expected = model.generate(**inputs, **controls)
        found = offloaded.generate(**inputs, **controls)
    assert torch.equal(found[0], expected[0])
    assert torch.equal(found[1], expected[1])


def test_quantized_llm_keeps_audio_parts_in_full_precision(model_and_inputs, tmp_path):
    pytest.importorskip("optimum.quanto")
    from transformers import QuantoConfig

    model, inputs = model_and_inputs
    model.save_pretrained(tmp_path)
    quantized = FunAudioChatForConditionalGeneration.from_pretrained(
        tmp_path, quantization_config=QuantoConfig(weights="int8")
    )
    converted = {name for name, module in quantized.named_modules() if type(module).__name__ == "QLinear"}
    assert converted and all(name.startswith("language_model.model.layers.") for name in converted)
    for name, parameter in quantized.named_parameters():
        if not name.startswith("language_model.model.layers."):
            assert type(parameter) is torch.nn.Parameter and parameter.dtype == torch.float32, name
    with torch.no_grad():
        reference = model(**inputs).logits
        logits = quantized(**inputs).logits
        # int8 weights: close to the full-precision model, not equal to it.
        assert 0 < (logits - reference).abs().max() < 0.1 * reference.abs().max()
        sequences, speech_ids = quantized.generate(**inputs, **GREEDY, max_new_tokens=4, force_audio_bos=True)
    assert sequences.shape[1] == inputs["input_ids"].shape[1] + 4 and speech_ids.shape[1] > 0


# ---------------------------------------------------------------------------------------- compiled path
@pytest.mark.slow
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_compiled_static_cache_decoding_equals_eager(model_and_inputs, attention):
    """transformers' compiled-decoding convention (static cache + compile_config; opted in on CPU) compiles the
    LLM step and the speech head's sub-step; tokens and codes equal the uncompiled path (fp32, padded batch), with
    the default attention and with the eager attention docs/generation.md recommends for compiling on CPU."""
    from transformers import CompileConfig

    model, inputs = model_and_inputs
    if attention != model.config._attn_implementation:
        model = copy.deepcopy(model)  # the fixture's model is shared by the module's tests
        model.set_attn_implementation(attention)
        assert model.audio_invert_tower.crq_transformer.layers[0].self_attn.config._attn_implementation == attention
    compile_config = CompileConfig()
    compile_config._compile_all_devices = True
    controls = {**GREEDY, "max_new_tokens": 6, "min_new_tokens": 6, "force_audio_bos": True}
    with torch.no_grad():
        eager = model.generate(**inputs, **controls, return_dict_in_generate=True)
        compiled = model.generate(
            **inputs,
            **controls,
            cache_implementation="static",
            compile_config=compile_config,
            return_dict_in_generate=True,
        )
    assert hasattr(model, "_compiled_call")
    assert not any(name.startswith("_compiled") for name in vars(model.audio_invert_tower)), "per-call state"
    assert torch.equal(compiled.sequences, eager.sequences)
    assert torch.equal(compiled.speech_ids, eager.speech_ids)
    assert compiled.speech_attention_mask.sum() > 0


@pytest.mark.slow
def test_compiled_sampled_speech_is_reproducible_per_seed(model_and_inputs):
    """Compiled decoding samples speech codes on the device inside the compiled SRH group: a seed repeats them, and
    the group compiles once for the call's shapes (no recompilation from one step to the next)."""
    from transformers import CompileConfig

    model, inputs = model_and_inputs
    compile_config = CompileConfig()
    compile_config._compile_all_devices = True
    controls = {
        **GREEDY,
        "speech_do_sample": True,
        "speech_repetition_penalty": 1.2,
        "max_new_tokens": 5,
        "min_new_tokens": 5,
        "force_audio_bos": True,
        "cache_implementation": "static",
        "compile_config": compile_config,
        "return_dict_in_generate": True,
    }
    runs = []
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=False):
        for seed in (0, 0, 1):
            torch.manual_seed(seed)
            runs.append(model.generate(**inputs, **controls).speech_ids)
            if seed == 0 and len(runs) == 1:
                torch._dynamo.config.error_on_recompile = True  # the later calls reuse the compiled graphs
    assert runs[0].shape[1] > 0
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


# ------------------------------------------------------------------------------------------ synced gpus
def test_synced_gpus_keeps_a_finished_peer_stepping(model_and_inputs, monkeypatch):
    """Under ZeRO-3/FSDP a finished rank must keep running forward passes until every rank is done."""
    model, inputs = model_and_inputs
    controls = {**GREEDY, "max_new_tokens": 8, "force_audio_bos": True}
    with torch.no_grad():
        expected = model.generate(**inputs, **controls, return_dict_in_generate=True)
    calls = []
    extra_steps = 3
    finished_calls = []

    def other_peers_still_running(self, this_peer_finished, synced_gpus, device):
        calls.append(synced_gpus)
        if not this_peer_finished:
            return True
        finished_calls.append(1)
        return len(finished_calls) <= extra_steps  # the other ranks need this many more forward passes

    forward_calls, speech_head_calls = [], []
    hook = model.language_model.model.register_forward_hook(lambda *_: forward_calls.append(1))
    head_layer = model.audio_invert_tower.crq_transformer.layers[0]
    head_hook = head_layer.register_forward_hook(lambda *_: speech_head_calls.append(1))
    monkeypatch.setattr(type(model), "_has_unfinished_sequences", other_peers_still_running)
    try:
        with torch.no_grad():
            found = model.generate(**inputs, **controls, synced_gpus=True, return_dict_in_generate=True)
    finally:
        hook.remove()
        head_hook.remove()
    assert all(calls)
    assert torch.equal(found.sequences, expected.sequences)
    assert torch.equal(found.speech_ids, expected.speech_ids)
    generated = expected.sequences.shape[1] - inputs["input_ids"].shape[1]
    assert len(forward_calls) == generated + extra_steps
    # the speech head too (its layers are sharded as well): one prefill call, then k sub-steps per step, even
    # for the steps past this rank's own max_new_tokens (its dropped groups reuse the same cache columns)
    k = model.group_size
    assert len(speech_head_calls) == k * (generated + extra_steps)


# ------------------------------------------------------------------------------------- refused clearly
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_beams": 2}, "greedy decoding and sampling only"),
        ({"prompt_lookup_num_tokens": 3}, "assisted generation"),
        ({"penalty_alpha": 0.6, "top_k": 4}, "greedy decoding and sampling only"),
        ({"speech_repetition_penalty": 0.0}, "speech_repetition_penalty has to be a strictly positive"),
        ({"speech_repetition_penalty": -1.0}, "speech_repetition_penalty has to be a strictly positive"),
        ({"speech_temperature": 0.0}, "speech_do_sample=False"),
        ({"speech_top_p": 0.0}, "speech_top_p"),
    ],
)
def test_unsupported_or_unusable_settings_are_refused(model_and_inputs, kwargs, message):
    model, inputs = model_and_inputs
    with pytest.raises(ValueError, match=message):
        model.generate(**inputs, max_new_tokens=2, **kwargs)


def test_assistant_model_is_refused(model_and_inputs):
    model, inputs = model_and_inputs
    with pytest.raises(ValueError, match="assisted generation"):
        model.generate(**inputs, max_new_tokens=2, assistant_model=model)


def test_greedy_speech_with_zero_temperature_is_accepted(model_and_inputs):
    """Greedy speech ignores the temperature: 0 is accepted and gives the reply of the default temperature."""
    model, inputs = model_and_inputs
    controls = dict(max_new_tokens=6, do_sample=False, speech_do_sample=False, force_audio_bos=True)
    zero = model.generate(**inputs, speech_temperature=0.0, return_dict_in_generate=True, **controls)
    default = model.generate(**inputs, return_dict_in_generate=True, **controls)
    assert zero.speech_ids.shape[-1] > 0
    assert torch.equal(zero.sequences, default.sequences) and torch.equal(zero.speech_ids, default.speech_ids)


def test_malformed_inputs_are_refused_before_indexing(model_and_inputs):
    model, inputs = model_and_inputs
    with pytest.raises(ValueError, match=r"\(batch, length\)"):
        model.generate(input_ids=torch.tensor([1, 2, 3]), max_new_tokens=2)
    with pytest.raises(ValueError, match="outside the LLM vocabulary"):
        model.generate(input_ids=torch.tensor([[1, 2, 512]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="outside the LLM vocabulary"):
        model(input_ids=torch.tensor([[1, -3]]))
    bad = dict(inputs)
    bad["input_features"] = inputs["input_features"].clone()
    bad["input_features"][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        model.generate(**bad, max_new_tokens=2)


def test_streamer_consumer_gets_the_error_when_generate_fails(model_and_inputs):
    from fun_audio_chat.modeling.streamers import GenerationFailedError

    model, inputs = model_and_inputs
    streamer = FunAudioChatIteratorStreamer(timeout=60)
    failing = {**inputs, "input_ids": inputs["input_ids"].clone()}
    failing["input_ids"][0, 0] = 10_000

    def run():
        try:
            model.generate(**failing, max_new_tokens=2, streamer=streamer)
        except ValueError:
            pass

    thread = threading.Thread(target=run)
    thread.start()
    with pytest.raises(GenerationFailedError, match="outside the LLM vocabulary") as caught:
        list(streamer)
    thread.join(timeout=60)
    assert isinstance(caught.value.__cause__, ValueError)


def test_streamer_consumer_gets_an_error_raised_mid_generation(model_and_inputs, monkeypatch):
    model, inputs = model_and_inputs
    from fun_audio_chat.modeling.generation_fun_audio_chat import SpeechDecoder
    from fun_audio_chat.modeling.streamers import GenerationFailedError

    original = SpeechDecoder.commit
    steps = []

    def failing_commit(self, group, rows):
        steps.append(1)
        if len(steps) == 3:
            raise RuntimeError("simulated failure")
        return original(self, group, rows)

    monkeypatch.setattr(SpeechDecoder, "commit", failing_commit)
    streamer = FunAudioChatIteratorStreamer(timeout=60)
    thread = threading.Thread(
        target=lambda: pytest.raises(
            RuntimeError, model.generate, **inputs, max_new_tokens=6, force_audio_bos=True, streamer=streamer
        )
    )
    thread.start()
    events = []
    with pytest.raises(GenerationFailedError, match="simulated failure"):
        for event in streamer:
            events.append(event)
    thread.join(timeout=60)
    assert events, "the steps before the failure were streamed"
