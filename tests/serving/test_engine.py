"""ServingEngine: rows decoded together equal their solo runs (also when they join a running batch), seeds repeat
whatever shares the batch, cancellation stops a row, a bad row does not fail its batch."""

from __future__ import annotations

import numpy as np
import pytest

from fun_audio_chat.serving import ServingEngine, TextDelta, TurnDone, TurnFailed, TurnRequest

from .conversations import spoken, submit_together, typed


@pytest.fixture
def engine(tiny_pair):
    model, processor = tiny_pair
    # a wide batch window so that requests submitted back to back share one generate call
    engine = ServingEngine(model, processor, max_batch_size=8, batch_window=0.3).start()
    yield engine
    engine.close()


def test_batched_rows_equal_their_solo_runs(engine):
    conversations = [spoken(), typed("What is the weather like?"), spoken(1.5), typed("Hi")]
    for speech in (True, False):
        requests = [TurnRequest(c, speech=speech, max_new_tokens=10, temperature=0) for c in conversations]
        solo = [engine.submit(request).result() for request in requests]
        together = submit_together(engine, requests)
        assert [r.metrics.batch_size for r in solo] == [1, 1, 1, 1]
        assert [r.metrics.batch_size for r in together] == [4, 4, 4, 4]
        assert [r.text for r in together] == [r.text for r in solo]
        assert [r.codes for r in together] == [r.codes for r in solo]
        if speech:
            assert all(len(r.codes) > 0 for r in solo)
        else:
            assert all(r.codes is None for r in solo)


def test_streamed_text_pieces_make_the_final_text(engine):
    handle = engine.submit(TurnRequest(spoken(), speech=True, max_new_tokens=12, temperature=0))
    events = list(handle)
    assert isinstance(events[-1], TurnDone)
    pieces = "".join(event.text for event in events if isinstance(event, TextDelta))
    assert pieces == events[-1].result.text
    metrics = events[-1].result.metrics
    assert metrics.completion_tokens == 12 and events[-1].result.finish_reason == "length"
    assert 0 <= metrics.queue_seconds <= metrics.first_text_seconds <= metrics.total_seconds


def test_seed_makes_sampling_repeatable_whatever_shares_the_batch(engine):
    request = TurnRequest(spoken(), speech=True, max_new_tokens=10, temperature=1.0, top_p=0.95, seed=1234)
    alone = engine.submit(request).result()
    first, second = submit_together(engine, [request, request])
    assert alone.metrics.batch_size == 1 and first.metrics.batch_size == second.metrics.batch_size == 2
    assert (first.text, first.codes) == (second.text, second.codes) == (alone.text, alone.codes)
    other = engine.submit(
        TurnRequest(spoken(), speech=True, max_new_tokens=10, temperature=1.0, top_p=0.95, seed=99)
    ).result()
    assert (other.text, other.codes) != (first.text, first.codes)


def test_greedy_means_greedy_speech_too(engine):
    request = TurnRequest(spoken(), speech=True, max_new_tokens=10, temperature=0)
    first = engine.submit(request).result()
    import torch

    torch.manual_seed(12345)  # a different global RNG state must not change a greedy reply
    second = engine.submit(request).result()
    assert first.codes == second.codes and first.text == second.text


def test_cancelled_row_stops_and_the_others_finish(engine):
    long = TurnRequest(typed("Tell me a long story"), speech=False, max_new_tokens=300, temperature=0)
    short = TurnRequest(typed("Hi"), speech=False, max_new_tokens=300, temperature=0)
    victim = engine.submit(long)
    survivor = engine.submit(short)
    for event in victim:
        if isinstance(event, TextDelta):
            victim.cancel()
            break
    result = survivor.result()
    assert result.metrics.batch_size == 2 and result.metrics.completion_tokens == 300
    victim_done = [event for event in victim if isinstance(event, (TurnDone, TurnFailed))][-1]
    assert isinstance(victim_done, TurnDone) and victim_done.result.finish_reason == "cancelled"

    alone = engine.submit(long)
    for event in alone:
        if isinstance(event, TextDelta):
            alone.cancel()
            break
    done = [event for event in alone if isinstance(event, TurnDone)][-1]
    # the only row cancelled: decoding stops long before its 300 steps
    assert done.result.finish_reason == "cancelled" and done.result.metrics.completion_tokens < 300
    assert done.result.metrics.total_seconds < result.metrics.total_seconds


def test_a_row_that_does_not_fit_fails_alone(engine):
    fine = TurnRequest(typed("Hi"), speech=False, max_new_tokens=8, temperature=0)
    too_long = TurnRequest(typed("word " * 1100), speech=False, max_new_tokens=8, temperature=0)
    fine_handle, bad_handle = engine.submit(fine), engine.submit(too_long)
    events = list(bad_handle)
    assert isinstance(events[-1], TurnFailed) and isinstance(events[-1].error, ValueError)
    assert "exceeds the model's context" in str(events[-1].error)
    assert fine_handle.result().metrics.completion_tokens == 8


def test_engine_rejects_bad_settings(tiny_pair):
    model, processor = tiny_pair
    with pytest.raises(ValueError, match="max_batch_size"):
        ServingEngine(model, processor, max_batch_size=0)
    with pytest.raises(ValueError, match="synthesis_workers"):
        ServingEngine(model, processor, synthesis_workers=0)
    engine = ServingEngine(model, processor)
    assert not engine.can_speak and engine.sample_rate is None
    result = engine.submit(TurnRequest(typed("Hi"), speech=True, max_new_tokens=4, temperature=0)).result()
    # without a detokenizer a speech request still gets its text and codes, but no audio
    assert result.audio is None and len(result.codes) > 0 and np.isfinite(result.metrics.total_seconds)
    engine.close()


class _EndAtStep:
    """Logits processor ending each reply (``<|im_end|>``) after a number of steps chosen by its prompt length, so a
    row ends at the same step in a batch and alone. Rows are recognised by their prompt (the first sequence of each
    reply it sees), whether they arrive as rows of one batch or one by one."""

    def __init__(self, end_token: int, pad_token: int, steps_by_prompt_length: dict[int, int]):
        self.end_token, self.pad_token, self.steps = end_token, pad_token, steps_by_prompt_length
        self.prompts: list = []

    def _step(self, row):
        import torch

        real = row[row != self.pad_token] if (row == self.pad_token).any() else row
        for prompt in self.prompts:
            if real.shape[0] >= prompt.shape[0] and torch.equal(real[: prompt.shape[0]], prompt):
                return real.shape[0] - prompt.shape[0], self.steps[int(prompt.shape[0])]
        self.prompts.append(real.clone())
        return 0, self.steps[int(real.shape[0])]

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        for index, row in enumerate(input_ids):
            step, end = self._step(row)
            if step >= end:
                scores[index] = float("-inf")
                scores[index, self.end_token] = 0.0
            else:
                scores[index, self.end_token] = float("-inf")
        return scores


@pytest.mark.parametrize("speech", [False, True])
def test_a_row_that_ends_early_is_answered_before_its_batch_ends(tiny_pair, speech):
    from transformers import LogitsProcessorList

    model, processor = tiny_pair
    short, long = typed("Hi"), typed("Tell me a long story about the weather")
    lengths = [
        int(
            processor.apply_chat_template(
                c,
                add_generation_prompt=True,
                speech_output=speech,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
            )["attention_mask"].sum()
        )
        for c in (short, long)
    ]
    end_at = _EndAtStep(processor.im_end_token_id, processor.tokenizer.pad_token_id, {lengths[0]: 3, lengths[1]: 200})
    engine = ServingEngine(
        model, processor, batch_window=0.3, generate_kwargs={"logits_processor": LogitsProcessorList([end_at])}
    ).start()
    try:
        requests = [TurnRequest(c, speech=speech, max_new_tokens=220, temperature=0) for c in (short, long)]
        solo = [engine.submit(request).result() for request in requests]
        handles = [engine.submit(request) for request in requests]
        first = handles[0].result()
        long_still_running = not handles[1].finished.is_set()
        together = [first, handles[1].result()]
    finally:
        engine.close()
    assert [r.metrics.batch_size for r in together] == [2, 2]
    assert [r.metrics.completion_tokens for r in together] == [4, 201]
    assert [r.finish_reason for r in together] == ["stop", "stop"]
    assert [(r.text, r.codes) for r in together] == [(r.text, r.codes) for r in solo]
    assert long_still_running  # the short row was answered while the long one was still decoding


def test_a_generate_failure_mid_reply_fails_the_turn_with_its_own_error(tiny_pair):
    from transformers import LogitsProcessorList

    model, processor = tiny_pair
    calls = []

    def fail_on_eighth_step(input_ids, scores):
        calls.append(1)
        if len(calls) == 8:
            raise ValueError("boom at step 8")
        return scores

    engine = ServingEngine(
        model, processor, generate_kwargs={"logits_processor": LogitsProcessorList([fail_on_eighth_step])}
    ).start()
    try:
        events = list(engine.submit(TurnRequest(typed("Hi"), speech=True, max_new_tokens=12, temperature=0)))
        assert any(isinstance(event, TextDelta) for event in events)  # it failed after streaming had begun
        assert isinstance(events[-1], TurnFailed) and isinstance(events[-1].error, ValueError)
        assert "boom at step 8" in str(events[-1].error)
        calls.append(1)  # later calls pass: the engine keeps serving
        assert engine.submit(TurnRequest(typed("Hi"), speech=False, max_new_tokens=4, temperature=0)).result()
    finally:
        engine.close()


@pytest.mark.parametrize(("chunked", "workers", "growth"), [(False, 1, 1), (True, 1, 1), (False, 2, 2)])
def test_concurrent_replies_carry_the_audio_of_their_own_streaming_session(tiny_pair, chunked, workers, growth):
    """The speech thread renders all replies in one batched call per tick (with two workers, each its own share,
    side by side): each reply's audio equals its own codes streamed through a session of the same kind alone."""
    import torch

    from fun_audio_chat.tiny import tiny_detokenizer

    model, processor = tiny_pair
    detokenizer = tiny_detokenizer()
    engine = ServingEngine(
        model,
        processor,
        detokenizer,
        batch_window=0.3,
        chunked_synthesis=chunked,
        synthesis_workers=workers,
        synthesis_hop_growth=growth,
    ).start()
    try:
        requests = [
            TurnRequest(c, speech=True, max_new_tokens=16, temperature=0)
            for c in (spoken(), typed("Hi there"), typed("Hello"))
        ]
        handles = [engine.submit(request) for request in requests]
        results = [handle.result() for handle in handles]
    finally:
        engine.close()
    # the least busy worker takes each new turn: with two workers, both render
    assert sorted({handle.speech_worker for handle in handles}) == list(range(workers))
    assert [r.metrics.batch_size for r in results] == [3, 3, 3]
    for result in results:
        assert len(result.codes) > 0
        session = detokenizer.streaming_session(chunked=chunked, hop_growth=growth)
        alone = torch.cat([session.push(result.codes), session.finish()]).numpy()
        assert result.audio.shape == alone.shape == (len(result.codes) * 960,)
        np.testing.assert_allclose(result.audio, alone, atol=1e-4, rtol=0)
        assert result.metrics.first_speech_seconds <= result.metrics.first_audio_seconds
