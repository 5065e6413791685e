"""Tool-call parsing on hostile model output: linear time, and non-strict mode never raises."""

import random
import time

import pytest

from fun_audio_chat.processing.tool_calling import (
    StreamingToolCallParser,
    ToolCallParseError,
    parse_tool_calls,
    strip_tool_calls,
)


def _best_time(fn, repeats=3, at_least=0.02) -> float:
    """Best CPU time per call (repeated until ``at_least`` seconds, so tiny inputs are measurable). CPU time, not
    wall time: a busy machine stretches long runs more than short ones, which would inflate the ratios below."""
    best = float("inf")
    for _ in range(repeats):
        calls, start = 0, time.process_time()
        while True:
            fn()
            calls += 1
            elapsed = time.process_time() - start
            if elapsed >= at_least:
                break
        best = min(best, elapsed / calls)
    return best


LINEAR_BOUND = 20  # growth ratio at factor 8: about 8 when linear, 64 when quadratic


def _growth(make_input, run, small: int, factor: int = 8, attempts: int = 3) -> float:
    """Time ratio of ``run`` on an input ``factor`` times larger: about ``factor`` when linear, ``factor**2``
    (64) when quadratic. A loaded machine (the suite runs on two workers) can stretch one measurement past
    ``LINEAR_BOUND``, so the ratio is measured again, up to ``attempts`` times, until one is under it: a quadratic
    parser is over it every time, a linear one is under it nearly always."""
    small_input, large_input = make_input(small), make_input(small * factor)
    run(small_input)  # warm-up
    best = float("inf")
    for _ in range(attempts):
        ratio = _best_time(lambda: run(large_input)) / max(_best_time(lambda: run(small_input)), 1e-6)
        best = min(best, ratio)
        if best < LINEAR_BOUND:
            break
    return best


def _stream(text: str, piece: int = 4):
    parser = StreamingToolCallParser()
    calls = []
    for i in range(0, len(text), piece):
        calls += parser.feed(text[i : i + piece])
    return calls + parser.finish()


@pytest.mark.parametrize(
    "make_input",
    [
        lambda n: "<tool_call>" * n,  # unclosed tags, each scanned to the end by a lazy regex
        lambda n: "<tool_call>{" * n + "</tool_call>",
        lambda n: "x" * (11 * n),
    ],
    ids=["unclosed-tags", "one-huge-block", "plain-text"],
)
def test_parse_tool_calls_is_linear(make_input):
    # sizes a quadratic parser fails on within seconds (16000 unclosed tags took it 18 s); 2000 units are at least
    # 22 000 characters, so the small input is not so small that its time is all call overhead
    assert _growth(make_input, parse_tool_calls, small=2000) < LINEAR_BOUND
    assert _growth(make_input, strip_tool_calls, small=2000) < LINEAR_BOUND


@pytest.mark.parametrize(
    "make_input",
    [
        lambda n: "<tool_call>" + "a" * n,  # one open block that keeps growing
        lambda n: "<tool_call>" * (n // 11),
        lambda n: '<tool_call>{"name": "f"}</tool_call>' * (n // 35),
    ],
    ids=["open-block", "unclosed-tags", "many-calls"],
)
def test_streaming_parser_is_linear_in_small_pieces(make_input):
    assert _growth(make_input, _stream, small=8000) < LINEAR_BOUND


def test_streaming_equals_whole_text_on_random_tag_soup():
    rng = random.Random(0)
    atoms = ["<tool_call>", "</tool_call>", '{"name": "f", "arguments": {"a": 1}}', "x", "<tool", "_call>", "</", " "]
    for _ in range(200):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 30)))
        for piece in (1, 3, 7, 1000):
            assert _stream(text, piece) == parse_tool_calls(text), (text, piece)


def test_parse_keeps_the_first_unclosed_block_whole():
    calls = parse_tool_calls('<tool_call>{"name": "a"}</tool_call> <tool_call>{"name": "b"} <tool_call>tail')
    assert calls[0] == {"name": "a", "arguments": {}}
    assert calls[1]["name"] == "b" and calls[1]["unparsed"] == '{"name": "b"} <tool_call>tail'
    assert "no closing" in calls[1]["error"]


@pytest.mark.parametrize(
    "body, reason",
    [
        ('{"name": "f", "arguments": ' + "[" * 100000 + "]" * 100000 + "}", "nested too deeply"),
        ('{"name": "f", "arguments": {"n": ' + "7" * 5000 + "}}", "digits"),
        ('{"name": "f", "arguments": "' + "[" * 100000 + '"}', "not valid JSON"),
    ],
    ids=["deep-nesting", "5000-digit-int", "deep-nesting-in-string-arguments"],
)
def test_non_strict_reports_hostile_json_instead_of_raising(body, reason):
    (call,) = parse_tool_calls(f"<tool_call>{body}</tool_call>")
    assert call["arguments"] is None and call["name"] == "f" and reason in call["error"]
    (streamed,) = _stream(f"<tool_call>{body}</tool_call>", piece=4096)
    assert streamed == call
    with pytest.raises(ToolCallParseError):
        parse_tool_calls(f"<tool_call>{body}</tool_call>", strict=True)


def test_streaming_parser_text_is_everything_fed():
    parser = StreamingToolCallParser()
    for piece in ("ab", "<tool_", "call>{}", "</tool_call>"):
        parser.feed(piece)
    assert parser.text == "ab<tool_call>{}</tool_call>"
    parser.feed("z")
    assert parser.text.endswith("z")
