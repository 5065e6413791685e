"""Compiled continuous batching on fixed cache slots: the slot caches, the buckets, warm-up and admission.

The replies themselves are checked against generate() by every scenario of test_continuous_batching.py, which runs
on this decoder too; here is what is particular to slots.
"""

import pytest
import torch
from transformers import CompileConfig

from fun_audio_chat.modeling import ContinuousBatchDecoder
from fun_audio_chat.modeling.slot_batching import (
    SlotDecoding,
    SlotKVLayer,
    SlotKVStore,
    slot_cache_bytes,
    visible_bias,
)
from fun_audio_chat.tiny import tiny_model_and_processor

GREEDY_SPEECH = {"do_sample": False, "speech_do_sample": False, "force_audio_bos": True}


@pytest.fixture(scope="module")
def model_and_processor():
    model, processor = tiny_model_and_processor()
    return model.float(), processor


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles for its own slot shapes; start from dynamo's empty cache so no test inherits another's
    graphs (or its count towards dynamo's recompile limit)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _prompt(processor, text: str, speech: bool = True):
    return processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": text}]}],
        add_generation_prompt=True,
        speech_output=speech,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )


def _store(slots=3, capacity=6):
    return SlotKVStore(layers=2, slots=slots, heads=2, head_dim=4, capacity=capacity, dtype=torch.float32, device="cpu")


def test_a_step_writes_each_row_at_its_own_cursor_and_masks_the_rest():
    store = _store()
    store.cursor[:] = torch.tensor([0, 4, 2])
    layer = store.cache(3).layers[0]
    new_keys = torch.arange(3 * 2 * 4, dtype=torch.float32).view(3, 2, 1, 4) + 1
    keys, _ = layer.update(new_keys, -new_keys)
    for row, column in enumerate([0, 4, 2]):
        assert torch.equal(keys[row, :, column], new_keys[row, :, 0])
        assert torch.equal(store.values[0][row, :, column], -new_keys[row, :, 0])
        untouched = [other for other in range(6) if other != column]
        assert not keys[row, :, untouched].any()
    bias = visible_bias(store.cursor, store.window.columns, torch.float32)
    assert bias.shape == (3, 1, 1, 6)
    assert ((bias[:, 0, 0] == 0) == (torch.arange(6)[None, :] <= store.cursor[:, None])).all()
    with pytest.raises(ValueError, match="one new position per row"):
        layer.update(torch.zeros(3, 2, 2, 4), torch.zeros(3, 2, 2, 4))


def test_attention_reads_the_window_of_filled_columns_only():
    store = SlotKVStore(layers=1, slots=2, heads=1, head_dim=2, capacity=100, dtype=torch.float32, device="cpu")
    store.window.cover(3)
    assert store.window.columns.tolist() == list(range(32))  # powers of two from 32: few distinct widths
    store.cursor[:] = torch.tensor([2, 31])
    keys, values = store.cache(2).layers[0].update(torch.ones(2, 1, 1, 2), torch.ones(2, 1, 1, 2))
    assert keys.shape == values.shape == (2, 1, 32, 2) and keys[1, 0, 31].tolist() == [1.0, 1.0]
    store.window.cover(33)
    assert store.window.columns.shape == (64,)
    store.window.cover(70)
    assert store.window.columns.shape == (100,)  # capped at the slot
    assert visible_bias(store.cursor, store.window.columns, torch.float32).shape == (2, 1, 1, 100)


def test_a_bucket_cache_is_a_view_of_the_first_slots_and_stays_the_same_object():
    store = _store()
    small = store.cache(2)
    assert store.cache(2) is small
    assert small.layers[1].keys.data_ptr() == store.keys[1].data_ptr() and small.layers[1].keys.shape[0] == 2
    store.cursor[1] = 3
    assert isinstance(small.layers[0], SlotKVLayer) and int(small.layers[0].cursor[1]) == 3


def test_moving_slots_reads_every_source_before_writing():
    store = _store()
    for slot in range(3):
        store.load(slot, [torch.full((1, 2, slot + 1, 4), float(slot + 1))] * 2, [torch.zeros(1, 2, slot + 1, 4)] * 2)
    assert store.cursor.tolist() == [1, 2, 3]
    store.move([0, 1], [1, 0])  # a swap: each target must get the other slot's old contents
    assert store.cursor.tolist() == [2, 1, 3]
    assert (store.keys[0][0, :, :2] == 2).all() and (store.keys[1][1, :, :1] == 1).all()
    with pytest.raises(ValueError, match="does not fit a slot"):
        store.load(0, [torch.zeros(1, 2, 7, 4)], [torch.zeros(1, 2, 7, 4)])


def test_warm_up_compiles_every_bucket_and_steps_never_recompile(model_and_processor):
    model, processor = model_and_processor
    decoder = ContinuousBatchDecoder(model, CompileConfig(backend="eager"), slots=3, context=128)
    assert decoder.compiled
    assert sorted(decoder.warm_up()) == [1, 2, 3]
    prompts = [_prompt(processor, text) for text in ("hello", "good morning there", "thank you")]
    # Rows join one by one (buckets 1, 2, then 3), the second leaves, a text-only row joins, and the first grows past
    # 64 positions (attention windows of widths the warm-up never ran): no new graph.
    assert prompts[0]["input_ids"].shape[1] + 30 > 64
    with torch._dynamo.config.patch(error_on_recompile=True):
        decoder.add(prompts[0], **GREEDY_SPEECH, max_new_tokens=30)
        decoder.step()
        decoder.add(prompts[1], **GREEDY_SPEECH, max_new_tokens=2)
        decoder.step()
        decoder.add(prompts[2], **GREEDY_SPEECH, max_new_tokens=8)
        decoder.step()
        decoder.add(_prompt(processor, "city", speech=False), do_sample=False, return_speech=False, max_new_tokens=3)
        while decoder.has_rows:
            decoder.step()


def test_holes_are_filled_by_the_last_rows(model_and_processor):
    model, processor = model_and_processor
    decoder = ContinuousBatchDecoder(model, CompileConfig(backend="eager"), slots=3, context=128)
    decoder.warm_up()
    first = decoder.add(_prompt(processor, "hello"), **GREEDY_SPEECH, max_new_tokens=2)
    second = decoder.add(_prompt(processor, "good"), **GREEDY_SPEECH, max_new_tokens=6)
    third = decoder.add(_prompt(processor, "thank you"), **GREEDY_SPEECH, max_new_tokens=6)
    decoder.step()
    assert decoder.row_ids == [first, second, third]
    decoder.step()  # the first row ends: the last row takes its slot, the second stays where it is
    assert decoder.row_ids == [third, second]


def test_rows_that_do_not_fit_are_refused_and_the_batch_goes_on(model_and_processor):
    model, processor = model_and_processor
    with pytest.raises(ValueError, match="needs context="):
        ContinuousBatchDecoder(model, CompileConfig(backend="eager"), slots=2)
    decoder = ContinuousBatchDecoder(model, CompileConfig(backend="eager"), slots=1, context=40)
    with pytest.raises(RuntimeError, match="before the first row|compile_config"):
        ContinuousBatchDecoder(model).warm_up()
    decoder.warm_up()
    prompt = _prompt(processor, "hello")
    length = prompt["input_ids"].shape[1]
    with pytest.raises(ValueError, match=r"exceed the compiled decoder's slot context of 40"):
        decoder.add(prompt, **GREEDY_SPEECH, max_new_tokens=41 - length)
    row = decoder.add(prompt, **GREEDY_SPEECH, max_new_tokens=40 - length)
    with pytest.raises(RuntimeError, match="all 1 cache slots are taken"):
        decoder.add(prompt, **GREEDY_SPEECH, max_new_tokens=1)
    with pytest.raises(RuntimeError, match="before the first row"):
        decoder.warm_up()
    steps = []
    while decoder.has_rows:
        steps += decoder.step()
    assert [step.row_id for step in steps] == [row] * (40 - length) and steps[-1].finish_reason == "length"


def test_slot_cache_bytes_is_what_the_slots_allocate(model_and_processor):
    model, _ = model_and_processor
    decoding = SlotDecoding(model, CompileConfig(backend="eager"), slots=2, context=50)
    buffers = [*decoding.llm.keys, *decoding.llm.values, *decoding.srh.keys, *decoding.srh.values]
    assert sum(buffer.numel() * buffer.element_size() for buffer in buffers) == 2 * slot_cache_bytes(model, 50)
    assert decoding.srh.capacity == model.group_size * 51  # a row's SRH cache as SpeechDecoder.start sizes it
