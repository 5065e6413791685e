"""Every case recorded from the official CosyVoice 3 code (tiny checkpoint, fp32 CPU) against our modules."""

from __future__ import annotations

import pytest
import torch

from .conftest import load_case, max_diff


def test_flow_offline_mel_and_cfm_intermediates(official_model):
    inputs, outputs, meta = load_case("flow_offline")
    trace = {}
    with torch.inference_mode():
        mel = official_model.flow(inputs["token"].long(), inputs["embedding"], finalize=True, trace=trace)
    assert max_diff(mel, outputs["mel"]) <= 1e-4
    assert max_diff(trace["speaker"], outputs["spk_projected"]) <= 1e-5
    assert max_diff(trace["mu"], outputs["cfm_mu"]) <= 1e-5
    assert torch.equal(trace["z0"], outputs["cfm_z0"])  # the fixed noise table, bit for bit
    assert max_diff(torch.stack(trace["t"]), outputs["cfm_t"]) <= 1e-7
    for step in range(meta["call"]["n_timesteps"]):  # x entering every Euler step
        assert max_diff(trace["x_in"][step], outputs["cfm_x_in"][step : step + 1]) <= 1e-4, step
    assert max_diff(torch.cat(trace["v_cond"][:2]), outputs["cfm_v_cond"]) <= 1e-4
    assert max_diff(torch.cat(trace["v_uncond"][:2]), outputs["cfm_v_uncond"]) <= 1e-4


@pytest.mark.parametrize("chunked", [False, True])
def test_dit_estimator_with_and_without_chunk_mask(official_model, chunked):
    inputs, outputs, meta = load_case("dit_estimator")
    assert bool(inputs["mask"].all())  # the case has no padding
    with torch.inference_mode():
        out = official_model.flow.estimator(
            inputs["x"],
            inputs["mu"],
            inputs["t"],
            inputs["spks"],
            inputs["cond"],
            chunk_frames=meta["static_chunk_size"] if chunked else None,
        )
    key = "out_streaming_true" if chunked else "out_streaming_false"
    assert max_diff(out, outputs[key]) <= 1e-4
    # the chunk mask matters on this input: the other output is far away
    other = outputs["out_streaming_false" if chunked else "out_streaming_true"]
    assert max_diff(out, other) > 1e-3


def test_hift_offline_speech_source_f0(official_model):
    inputs, outputs, _ = load_case("hift_offline")
    trace = {}
    with torch.inference_mode():
        speech, f0 = official_model.hift(inputs["mel"], finalize=True, trace=trace)
    assert max_diff(f0, outputs["f0"]) <= 1e-3  # Hz, values ~50-200
    assert max_diff(trace["source"], outputs["source"]) <= 1e-4
    assert max_diff(speech, outputs["speech"]) <= 1e-4


def test_hift_not_finalizing_holds_back_eight_frames(official_model):
    inputs, outputs, _ = load_case("hift_offline")
    with torch.inference_mode():
        speech, f0 = official_model.hift(inputs["mel"], finalize=False)
    assert speech.shape[1] == (inputs["mel"].shape[2] - 8) * 480
    assert max_diff(f0, outputs["f0_finalize_false"]) <= 1e-3
    assert max_diff(speech, outputs["speech_finalize_false"]) <= 1e-4


def test_hift_batch_of_two(official_model):
    inputs, outputs, _ = load_case("hift_offline")
    with torch.inference_mode():
        speech, _ = official_model.hift(inputs["mel_batch2"], finalize=True)
    assert max_diff(speech, outputs["speech_batch2"]) <= 1e-4


@pytest.mark.parametrize("use_cache", [False, True], ids=["recompute", "windowed-vocoder"])
def test_hift_streaming_history(official_model, use_cache):
    """The vocoder part of the official streaming token2wav: mel history grows, new samples come back."""
    inputs, outputs, meta = load_case("hift_streaming")
    session = official_model.streaming_session(use_cache=use_cache)
    chunks = []
    for call in meta["calls"]:
        used = call["n_tokens"] - (0 if call["finalize"] else 3)
        new_mel = inputs["mel"][:, :, 2 * call["token_offset"] : 2 * used]
        session.mel_history = new_mel if session.mel_history is None else torch.cat([session.mel_history, new_mel], 2)
        chunks.append(session._vocode(call["finalize"]))
        assert chunks[-1].shape[0] == call["chunk_len"]
    assert max_diff(torch.cat(chunks), outputs["speech_concat"][0]) <= 1e-4


@pytest.mark.parametrize("use_cache", [False, True], ids=["recompute", "windowed-vocoder"])
def test_token2wav_streaming_web_demo_calls(official_model, use_cache):
    """Replaying the official calls one by one through ``session.step``: flow mel of every call and every chunk."""
    inputs, outputs, meta = load_case("token2wav_streaming_hop15")
    session = official_model.streaming_session(inputs["embedding"], use_cache=use_cache)
    tokens = inputs["token"][0]
    start = 0
    for index, call in enumerate(meta["calls"]):
        codes = tokens[call["token_start"] : call["token_start"] + call["n_tokens"]]
        with torch.inference_mode():
            mel = official_model.flow(codes[None].long(), inputs["embedding"], finalize=call["finalize"])
        assert max_diff(mel, outputs[f"call{index:02d}_flow_mel_full"]) <= 1e-4
        chunk = session.step(codes, token_offset=call["token_offset"], finalize=call["finalize"])
        assert chunk.shape[0] == call["chunk_len"]
        assert max_diff(chunk, outputs["speech_concat"][0, start : start + call["chunk_len"]]) <= 1e-4, index
        start += call["chunk_len"]


def test_push_follows_the_web_demo_schedule_chunk_by_chunk(official_model):
    inputs, outputs, meta = load_case("token2wav_streaming_hop15")
    session = official_model.streaming_session(inputs["embedding"])
    chunks = [session.push(code) for code in inputs["token"][0].view(-1, 1)]
    produced = [c for c in chunks if c.numel()]
    # a chunk exactly when offset + 15 + 3 codes exist (after codes 18, 33, 48)
    assert [i + 1 for i, c in enumerate(chunks) if c.numel()] == [18, 33, 48]
    tail = session.finish()
    lengths = [c.shape[0] for c in produced + [tail]]
    assert lengths == [call["chunk_len"] for call in meta["calls"]]
    assert max_diff(torch.cat(produced + [tail]), outputs["speech_concat"][0]) <= 1e-4


@pytest.mark.slow
def test_offline_770_tokens_two_merged_segments(official_model):
    inputs, outputs, meta = load_case("token2wav_offline_2seg")
    wave = official_model(inputs["token"][0], speaker_embedding=inputs["embedding"])
    assert wave.dtype == torch.float32 and wave.dim() == 1
    assert wave.shape[0] == sum(call["chunk_len"] for call in meta["calls"])
    assert max_diff(wave, outputs["speech"][0]) <= 1e-3  # reference stored in float16 (±6e-5 here)
