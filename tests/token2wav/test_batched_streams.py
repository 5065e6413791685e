"""``push_streams``: many streaming sessions advanced together (one batched flow call per kind of session —
full-attention or cached chunk-causal — and batched vocoder calls per round) give each session the audio it gets
alone."""

from __future__ import annotations

import pytest
import torch

VOCAB = 296  # the tiny detokenizer knows only the tiny model's real codes


def codes(n: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n,), generator=generator).tolist()


@pytest.fixture(scope="module")
def detokenizer():
    from fun_audio_chat.tiny import tiny_detokenizer

    det = tiny_detokenizer()
    det.config.flow.vocab_size = VOCAB  # only affects the input check; the weights keep their rows
    return det


def solo(det, pieces: list[list[int]], speaker=None, **session_kwargs) -> list[torch.Tensor]:
    session = det.streaming_session(speaker, **session_kwargs)
    out = [session.push(piece) for piece in pieces]
    out.append(session.finish())
    return out


def test_staggered_sessions_equal_their_solo_streams(detokenizer, monkeypatch):
    """Three replies of different lengths whose codes arrive in groups of 5 at different ticks, one with its own
    voice, one finishing early: every tick's audio of every session equals its solo stream's."""
    voice = torch.randn(1, 192, generator=torch.Generator().manual_seed(3))
    replies = {"a": codes(95, 1), "b": codes(60, 2), "c": codes(130, 4)}
    starts = {"a": 0, "b": 4, "c": 9}  # tick at which each reply's first group arrives
    speakers = {"a": None, "b": voice, "c": None}
    flow_rows, vocoder_rows = [], []
    forward_rows, vocoder = detokenizer.flow.forward_rows, detokenizer.hift.forward
    monkeypatch.setattr(
        detokenizer.flow, "forward_rows", lambda rows, *a: flow_rows.append(len(rows)) or forward_rows(rows, *a)
    )
    monkeypatch.setattr(
        detokenizer.hift, "forward", lambda mel, **k: vocoder_rows.append(mel.shape[0]) or vocoder(mel, **k)
    )
    sessions = {name: detokenizer.streaming_session(speakers[name]) for name in replies}
    groups = {name: [reply[i : i + 5] for i in range(0, len(reply), 5)] for name, reply in replies.items()}
    streamed = {name: [] for name in replies}
    last_tick = max(starts[name] + len(groups[name]) for name in replies)
    for tick in range(last_tick):
        due = [name for name in replies if 0 <= tick - starts[name] < len(groups[name])]
        entries = []
        for name in due:
            index = tick - starts[name]
            entries.append((sessions[name], groups[name][index], index == len(groups[name]) - 1))
        for name, audio in zip(due, detokenizer.push_streams(entries)):
            streamed[name].append(audio)
    monkeypatch.undo()
    # the sessions really shared calls: all three in one flow batch, vocoder windows batched too
    assert max(flow_rows) == 3 and max(vocoder_rows) >= 2
    for name, reply in replies.items():
        expected = solo(detokenizer, groups[name], speakers[name])
        # the solo stream's finish() tail is part of the last push_streams entry (finish=True)
        expected = expected[:-2] + [torch.cat(expected[-2:])]
        got = streamed[name]
        assert [a.shape for a in got] == [e.shape for e in expected], name
        for a, e in zip(got, expected):
            torch.testing.assert_close(a, e, atol=1e-4, rtol=0)
        assert sessions[name].finished
        assert sum(a.numel() for a in got) == len(reply) * 960


def test_a_long_stream_past_the_window_trim_and_vocoder_restart(detokenizer):
    """Past the 200-code trim and the 500-code vocoder restart, batched rounds still equal the solo stream."""
    long_reply, short_reply = codes(540, 7), codes(40, 8)
    together = [detokenizer.streaming_session(), detokenizer.streaming_session()]
    outs = [[], []]
    for start in range(0, 540, 45):
        entries = [(together[0], long_reply[start : start + 45], start + 45 >= 540)]
        if start < 40:
            entries.append((together[1], short_reply[start : start + 45], True))
        for row, audio in enumerate(detokenizer.push_streams(entries)):
            outs[row].append(audio)
    alone = solo(detokenizer, [long_reply[s : s + 45] for s in range(0, 540, 45)])
    torch.testing.assert_close(torch.cat(outs[0]), torch.cat(alone), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat(outs[1]), torch.cat(solo(detokenizer, [short_reply])), atol=1e-4, rtol=0)


def test_sessions_that_cannot_share_a_batch_still_run(detokenizer):
    chunked = detokenizer.streaming_session(chunked=True)
    plain = detokenizer.streaming_session()
    reply = codes(70, 9)
    got = detokenizer.push_streams([(chunked, reply, True), (plain, reply, True)])
    reference = detokenizer.streaming_session(chunked=True)
    torch.testing.assert_close(got[0], torch.cat([reference.push(reply), reference.finish()]), atol=1e-4, rtol=0)
    torch.testing.assert_close(got[1], torch.cat(solo(detokenizer, [reply])), atol=1e-4, rtol=0)


def feed_staggered(det, sessions, groups, starts):
    """Each session's groups of codes, one group per tick from its start tick, through one push_streams call per
    tick (the last group with finish=True); returns each session's audio per tick."""
    streamed = {name: [] for name in sessions}
    last_tick = max(starts[name] + len(groups[name]) for name in sessions)
    for tick in range(last_tick):
        due = [name for name in sessions if 0 <= tick - starts[name] < len(groups[name])]
        entries = []
        for name in due:
            index = tick - starts[name]
            entries.append((sessions[name], groups[name][index], index == len(groups[name]) - 1))
        for name, audio in zip(due, det.push_streams(entries)):
            streamed[name].append(audio)
    return streamed


def assert_equals_solo(det, streamed, groups, speakers, session_kwargs):
    for name, got in streamed.items():
        expected = solo(det, groups[name], speakers.get(name), **session_kwargs[name])
        # the solo stream's finish() tail is part of the last push_streams entry (finish=True)
        expected = expected[:-2] + [torch.cat(expected[-2:])]
        assert [a.shape for a in got] == [e.shape for e in expected], name
        for a, e in zip(got, expected):
            torch.testing.assert_close(a, e, atol=1e-4, rtol=0)
        assert sum(a.numel() for a in got) == sum(len(group) for group in groups[name]) * 960


def test_staggered_chunked_sessions_share_one_flow_computation_per_round(detokenizer, monkeypatch):
    """Cached chunk-causal sessions (hop 25 and 15, different start ticks and lengths, one with its own voice,
    one finishing early): each round's due calls run as one batched flow computation over the sessions' own
    caches, and every tick's audio equals the session's solo stream."""
    voice = torch.randn(1, 192, generator=torch.Generator().manual_seed(5))
    replies = {"a": codes(95, 11), "b": codes(70, 12), "c": codes(130, 13), "d": codes(35, 14)}
    starts = {"a": 0, "b": 1, "c": 5, "d": 4}  # four calls fall due in one round
    speakers = {"b": voice}
    session_kwargs = {
        "a": {"chunked": True},
        "b": {"chunked": True, "hop_tokens": 15},
        "c": {"chunked": True},
        "d": {"chunked": True, "hop_tokens": 15},
    }
    sessions = {name: detokenizer.streaming_session(speakers.get(name), **session_kwargs[name]) for name in replies}
    groups = {name: [reply[i : i + 5] for i in range(0, len(reply), 5)] for name, reply in replies.items()}
    chunked_per_round, rows_per_flow_call, estimator_batches = [], [], []
    run_stream_calls, forward_cached_rows = detokenizer._run_stream_calls, detokenizer.flow.forward_cached_rows
    monkeypatch.setattr(
        detokenizer,
        "_run_stream_calls",
        lambda calls: chunked_per_round.append(sum(s.chunked for s, _ in calls)) or run_stream_calls(calls),
    )
    monkeypatch.setattr(
        detokenizer.flow,
        "forward_cached_rows",
        lambda rows: rows_per_flow_call.append(len(rows)) or forward_cached_rows(rows),
    )
    hook = detokenizer.flow.estimator.register_forward_hook(
        lambda module, args, out: estimator_batches.append(args[0].shape[0])
    )
    try:
        streamed = feed_staggered(detokenizer, sessions, groups, starts)
    finally:
        hook.remove()
        monkeypatch.undo()
    # one flow computation per round holding every due session: num_steps estimator calls on the guidance batch
    assert rows_per_flow_call == [count for count in chunked_per_round if count]
    assert max(rows_per_flow_call) == 4
    steps = detokenizer.config.flow.num_steps
    assert estimator_batches == [2 * rows for rows in rows_per_flow_call for _ in range(steps)]
    assert all(session.finished for session in sessions.values())
    assert_equals_solo(detokenizer, streamed, groups, speakers, session_kwargs)


@pytest.mark.slow
def test_chunked_sessions_past_the_window_trim(detokenizer):
    """A cached chunk-causal stream past the 200-code trim (its flow cache starts over) next to a short one
    that ends early: batched rounds equal the solo streams."""
    replies = {"long": codes(260, 15), "short": codes(50, 16)}
    groups = {name: [reply[i : i + 20] for i in range(0, len(reply), 20)] for name, reply in replies.items()}
    session_kwargs = {name: {"chunked": True} for name in replies}
    sessions = {name: detokenizer.streaming_session(**session_kwargs[name]) for name in replies}
    streamed = feed_staggered(detokenizer, sessions, groups, {"long": 0, "short": 1})
    assert sessions["long"].trimmed_tokens == 200
    assert_equals_solo(detokenizer, streamed, groups, {}, session_kwargs)


def test_chunked_unchunked_and_recomputing_sessions_in_one_call(detokenizer, monkeypatch):
    """Full-attention and chunk-causal sessions in the same push_streams calls: one batched flow call of each
    kind per round; the recompute-everything reference session runs alone. Each equals its solo stream."""
    replies = {"full": codes(60, 17), "full2": codes(45, 18), "cached": codes(80, 19), "cached2": codes(55, 20)}
    replies["recompute"] = codes(40, 21)
    session_kwargs = {
        "full": {},
        "full2": {},
        "cached": {"chunked": True},
        "cached2": {"chunked": True, "hop_tokens": 15},
        "recompute": {"use_cache": False},
    }
    sessions = {name: detokenizer.streaming_session(**session_kwargs[name]) for name in replies}
    groups = {name: [reply[i : i + 10] for i in range(0, len(reply), 10)] for name, reply in replies.items()}
    full_rows, cached_rows = [], []
    forward_rows, forward_cached_rows = detokenizer.flow.forward_rows, detokenizer.flow.forward_cached_rows
    monkeypatch.setattr(
        detokenizer.flow, "forward_rows", lambda rows, *a: full_rows.append(len(rows)) or forward_rows(rows, *a)
    )
    monkeypatch.setattr(
        detokenizer.flow,
        "forward_cached_rows",
        lambda rows: cached_rows.append(len(rows)) or forward_cached_rows(rows),
    )
    streamed = feed_staggered(detokenizer, sessions, groups, dict.fromkeys(replies, 0))
    monkeypatch.undo()
    assert max(full_rows) == 2 and max(cached_rows) == 2
    assert not sessions["recompute"].batchable and sessions["cached"].batchable
    assert_equals_solo(detokenizer, streamed, groups, {}, session_kwargs)


def test_bad_entries_are_refused(detokenizer):
    session = detokenizer.streaming_session()
    with pytest.raises(ValueError, match="appear once"):
        detokenizer.push_streams([(session, [1], False), (session, [2], False)])
    with pytest.raises(ValueError, match=r"speech codes must be in \[0, 296\)"):
        detokenizer.push_streams([(detokenizer.streaming_session(), [296], False)])
    finished = detokenizer.streaming_session()
    detokenizer.push_streams([(finished, codes(10, 1), True)])
    with pytest.raises(RuntimeError, match="finished"):
        detokenizer.push_streams([(finished, [1], False)])
