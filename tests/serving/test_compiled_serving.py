"""Compiled decoding in the server: ``ServingEngine(compile_config=...)`` and ``serve --compile``.

The graphs are compiled with ``CompileConfig(backend="eager")``: dynamo still traces every batch bucket with
``fullgraph`` (so a graph break or a shape guard that does not hold fails here), without inductor's code generation.
"""

from __future__ import annotations

import pytest
from transformers import CompileConfig

from fun_audio_chat.cli import main
from fun_audio_chat.serving import ServingEngine, TurnFailed, TurnRequest

from .conftest import LocalServer, serve_subprocess
from .conversations import spoken, submit_together, typed

CONTEXT = 128  # positions per slot: the tiny model's spoken prompt is 53 positions, replies here are short
SLOTS = 4  # batch buckets 1, 2, 4


def _compiled_engine(tiny_pair, **kwargs) -> ServingEngine:
    model, processor = tiny_pair
    settings = {"max_batch_size": SLOTS, "batch_window": 0.3, "compile_context": CONTEXT, **kwargs}
    return ServingEngine(model, processor, compile_config=CompileConfig(backend="eager"), **settings)


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module")
def compiled_engine(tiny_pair):
    engine = _compiled_engine(tiny_pair).start()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def uncompiled_engine(tiny_pair):
    model, processor = tiny_pair
    engine = ServingEngine(model, processor, max_batch_size=SLOTS, batch_window=0.3).start()
    yield engine
    engine.close()


def test_warm_up_ran_at_start_for_every_bucket(compiled_engine):
    assert compiled_engine.compiled and compiled_engine.context_length == CONTEXT
    assert sorted(compiled_engine.warm_up_seconds) == [1, 2, 4]
    assert all(seconds > 0 for seconds in compiled_engine.warm_up_seconds.values())
    assert compiled_engine.slot_cache_bytes > 0 and _unique_graphs() > 0
    # the decoder that replaces one after a failed step reuses the compiled graphs
    before = _unique_graphs()
    decoder = compiled_engine._new_decoder()
    assert decoder.compiled and not decoder.has_rows
    assert _unique_graphs() == before


def test_concurrent_greedy_replies_equal_the_uncompiled_engine(compiled_engine, uncompiled_engine):
    conversations = [spoken(), typed("What is the weather like?"), spoken(1.5), typed("Hi")]
    graphs = _unique_graphs()
    for speech in (True, False):
        requests = [TurnRequest(c, speech=speech, max_new_tokens=10, temperature=0) for c in conversations]
        compiled = submit_together(compiled_engine, requests)
        uncompiled = submit_together(uncompiled_engine, requests)
        assert [r.metrics.batch_size for r in compiled] == [4, 4, 4, 4]
        assert [r.text for r in compiled] == [r.text for r in uncompiled]
        assert [r.codes for r in compiled] == [r.codes for r in uncompiled]
        assert all(bool(r.codes) == speech for r in compiled)
    # a late joiner, alone then with others: buckets 1 and 2 serve it without compiling anything new
    late = TurnRequest(spoken(2.0), speech=True, max_new_tokens=6, temperature=0)
    assert compiled_engine.submit(late).result().codes == uncompiled_engine.submit(late).result().codes
    assert _unique_graphs() == graphs


def test_request_longer_than_the_slot_context_fails_clearly(compiled_engine):
    handle = compiled_engine.submit(TurnRequest(spoken(), speech=True, max_new_tokens=CONTEXT, temperature=0))
    events = list(handle)
    assert isinstance(events[-1], TurnFailed) and isinstance(events[-1].error, ValueError)
    message = str(events[-1].error)
    assert f"compiled decoding context of {CONTEXT} positions" in message
    assert "lower max_tokens" in message and "--compile-context" in message
    # the engine goes on
    assert compiled_engine.submit(TurnRequest(typed("Hi"), max_new_tokens=3)).result().finish_reason == "length"


def test_http_client_gets_the_context_error_as_400(tiny_pair, hello_b64):
    openai = pytest.importorskip("openai")
    engine = _compiled_engine(tiny_pair, max_batch_size=2)
    with LocalServer(engine, "tiny", default_max_tokens=8) as server:
        assert sorted(engine.warm_up_seconds) == [1, 2]  # the server listened only after the warm-up
        messages = [
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": hello_b64, "format": "wav"}}]}
        ]
        client = server.client()
        reply = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=4)
        assert reply.usage.completion_tokens == 4
        with pytest.raises(openai.BadRequestError, match=f"compiled decoding context of {CONTEXT}"):
            client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=CONTEXT)


def test_unreadable_compile_cache_only_costs_a_compile(tiny_pair, tmp_path):
    cache = tmp_path / "compile.bin"
    cache.write_bytes(b"not a torch compile cache")
    engine = _compiled_engine(tiny_pair, max_batch_size=1, compile_cache=cache).start()
    try:
        assert sorted(engine.warm_up_seconds) == [1]  # torch warned and compiled from scratch
        assert not engine.compile_cache_loaded  # and the engine does not claim a warm start
        assert engine.submit(TurnRequest(typed("Hi"), max_new_tokens=3)).result().finish_reason == "length"
    finally:
        engine.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"compile_context": 512}, "pass compile_config too"),
        ({"compile_cache": "compile.bin"}, "pass compile_config too"),
        ({"compile_config": CompileConfig(backend="eager"), "compile_context": 1}, "integer >= 2"),
        ({"compile_config": CompileConfig(backend="eager"), "compile_context": 10**6}, "compile_context <= 1024"),
    ],
)
def test_engine_argument_errors_name_the_fix(tiny_pair, kwargs, message):
    model, processor = tiny_pair
    with pytest.raises(ValueError, match=message):
        ServingEngine(model, processor, **kwargs)


def test_engine_compile_cache_must_be_a_file(tiny_pair, tmp_path):
    model, processor = tiny_pair
    with pytest.raises(ValueError, match="is not a file"):
        ServingEngine(model, processor, compile_config=CompileConfig(backend="eager"), compile_cache=tmp_path)


def test_default_compile_context_is_capped_by_the_model(tiny_pair):
    model, processor = tiny_pair
    engine = ServingEngine(model, processor, compile_config=CompileConfig(backend="eager"))
    assert engine.compile_context == min(2048, model.config.text_config.max_position_embeddings) == 1024


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--compile-context", "512"], "--compile-context applies to compiled decoding: add --compile"),
        (["--compile-cache", "compile.bin"], "--compile-cache applies to compiled decoding: add --compile"),
        (["--compile-backend", "eager"], "--compile-backend applies to compiled decoding: add --compile"),
    ],
)
def test_cli_compile_options_need_compile(argv, message, capsys):
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"fun-audio-chat serve: error: {message} (or drop {argv[0]})."


def test_cli_compile_cache_directory_and_small_context_are_one_line_errors(tmp_path, capsys):
    assert main(["serve", "--compile", "--compile-cache", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fun-audio-chat serve: error: --compile-cache") and "pass a file path" in err
    assert len(err.splitlines()) == 1
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--compile", "--compile-context", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--compile-context: must be at least 2, got 1" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_serve_compile_subprocess(tmp_path, hello_b64):
    openai = pytest.importorskip("openai")
    log_path = tmp_path / "serve.log"
    cache = tmp_path / "compile.bin"
    options = ["--compile", "--compile-backend", "eager", "--compile-context", "128", "--compile-cache", str(cache)]
    with open(log_path, "w+") as log, serve_subprocess(["--max-batch-size", "2", *options], log) as (url, health):
        assert health["status"] == "ok" and health["compiled_context"] is not None
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0, timeout=120)
        messages = [
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": hello_b64, "format": "wav"}}]}
        ]
        reply = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=4)
        assert reply.usage.completion_tokens == 4
        with pytest.raises(openai.BadRequestError, match="compiled decoding context of 128"):
            client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=200)
    output = log_path.read_text()
    assert "compiled: batch 1" in output and "batch 2" in output


def test_a_failed_step_gets_a_new_compiled_decoder(tiny_pair, monkeypatch):
    from fun_audio_chat.modeling import ContinuousBatchDecoder

    engine = _compiled_engine(tiny_pair, max_batch_size=1).start()
    original_step, steps = ContinuousBatchDecoder.step, []

    def fail_first_step(decoder):
        steps.append(decoder.compiled)
        if len(steps) == 1:
            raise RuntimeError("injected step failure")
        return original_step(decoder)

    monkeypatch.setattr(ContinuousBatchDecoder, "step", fail_first_step)
    try:
        request = TurnRequest(typed("Hi"), max_new_tokens=3)
        with pytest.raises(RuntimeError, match="injected step failure"):
            engine.submit(request).result()
        assert engine.submit(request).result().finish_reason == "length"
        assert steps and all(steps)  # the replacement decoder is compiled too
    finally:
        engine.close()


def test_a_failed_warm_up_fails_start(tiny_pair, monkeypatch):
    from fun_audio_chat.modeling import ContinuousBatchDecoder

    def broken_warm_up(decoder):
        raise RuntimeError("injected compile failure")

    monkeypatch.setattr(ContinuousBatchDecoder, "warm_up", broken_warm_up)
    engine = _compiled_engine(tiny_pair, max_batch_size=1)
    with pytest.raises(RuntimeError, match="decoder could not be built: injected compile failure"):
        engine.start()
