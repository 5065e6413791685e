"""Prompt conditioning (a voice's prompt codes + prompt mel + embedding) against the official CosyVoice 3 recorded
with a prompt (``tests/fixtures/cosyvoice3_prompt``, tiny checkpoint, fp32 CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fun_audio_chat.token2wav import CosyVoice3Voice

from .conftest import max_diff

PROMPT_CASES = Path(__file__).resolve().parents[1] / "fixtures" / "cosyvoice3_prompt" / "cases"


def load_prompt_case(name: str) -> tuple[dict, dict, dict]:
    from safetensors.torch import load_file

    folder = PROMPT_CASES / name
    inputs = load_file(str(folder / "inputs.safetensors"))
    outputs = load_file(str(folder / "outputs.safetensors"))
    return inputs, outputs, json.loads((folder / "meta.json").read_text())


def oracle_voice(inputs: dict) -> CosyVoice3Voice:
    # the official layouts: embedding (1, 192), prompt_token (1, P), prompt_feat (1, 2P, 80)
    return CosyVoice3Voice("oracle", inputs["embedding"], inputs["prompt_token"], inputs["prompt_feat"])


@pytest.mark.parametrize("chunked", [False, True], ids=["full-attention", "chunk-causal"])
def test_flow_with_a_prompt_every_euler_step(official_model, chunked):
    name = "flow_prompt_chunked" if chunked else "flow_prompt_offline"
    inputs, outputs, meta = load_prompt_case(name)
    assert meta["call"]["streaming"] == chunked
    trace = {}
    with torch.inference_mode():
        mel = official_model.flow(
            inputs["token"].long(),
            inputs["embedding"],
            finalize=True,
            chunked=chunked,
            trace=trace,
            prompt_tokens=inputs["prompt_token"].long(),
            prompt_mel=inputs["prompt_feat"].transpose(1, 2),
        )
    assert mel.shape == (1, 80, 2 * inputs["token"].shape[1])  # the prompt frames are dropped
    assert max_diff(mel, outputs["mel"]) <= 1e-4
    assert max_diff(trace["x_out"], outputs["cfm_x_out"]) <= 1e-4  # prompt frames included
    if chunked:
        return
    assert max_diff(trace["mu"], outputs["cfm_mu"]) <= 1e-5  # prompt + reply codes through the look-ahead convs
    assert torch.equal(trace["cond"], outputs["cfm_cond"])  # the prompt mel, then zeros
    assert torch.equal(trace["z0"], outputs["cfm_z0"])
    assert max_diff(torch.stack(trace["t"]), outputs["cfm_t"]) <= 1e-7
    for step in range(meta["call"]["n_timesteps"]):  # x entering every Euler step, prompt frames included
        assert max_diff(trace["x_in"][step], outputs["cfm_x_in"][step : step + 1]) <= 1e-4, step
    assert max_diff(torch.cat(trace["v_cond"][:2]), outputs["cfm_v_cond"]) <= 1e-4
    assert max_diff(torch.cat(trace["v_uncond"][:2]), outputs["cfm_v_uncond"]) <= 1e-4


def test_offline_token_to_wave_with_a_voice(official_model):
    inputs, outputs, _ = load_prompt_case("token2wav_prompt_offline")
    wave = official_model(inputs["token"][0], voice=oracle_voice(inputs))
    assert max_diff(wave, outputs["speech"][0]) <= 1e-4
    # the prompt matters: the embedding alone gives other audio
    assert max_diff(official_model(inputs["token"][0], speaker_embedding=inputs["embedding"]), wave) > 1e-3


@pytest.mark.parametrize(
    "case, use_cache",
    [
        ("token2wav_prompt_stream_chunked", False),
        ("token2wav_prompt_stream_chunked", True),
        ("token2wav_prompt_hop15", True),
    ],
    ids=["chunked-recompute", "chunked-cached", "hop15-windowed-vocoder"],
)
def test_official_streaming_calls_with_a_prompt(official_model, case, use_cache):
    """Each recorded ``token2wav`` call replayed through ``session.step`` (chunk-causal where the official call
    was): every call's flow mel and audio chunk."""
    inputs, outputs, meta = load_prompt_case(case)
    voice = oracle_voice(inputs)
    chunked = any(call["stream"] for call in meta["calls"])
    session = official_model.streaming_session(voice=voice, chunked=chunked, use_cache=use_cache)
    tokens, start = inputs["token"][0], 0
    for index, call in enumerate(meta["calls"]):
        codes = tokens[: call["n_tokens"]]
        with torch.inference_mode():
            mel = official_model.flow(
                codes[None].long(),
                inputs["embedding"],
                finalize=call["finalize"],
                chunked=call["stream"],
                prompt_tokens=inputs["prompt_token"].long(),
                prompt_mel=inputs["prompt_feat"].transpose(1, 2),
            )
        assert max_diff(mel, outputs[f"call{index:02d}_flow_mel_full"]) <= 1e-4, index
        chunk = session.step(
            codes, token_offset=call["token_offset"], finalize=call["finalize"], chunked=call["stream"]
        )
        assert chunk.shape[0] == call["chunk_len"], index
        assert max_diff(chunk, outputs["speech_concat"][0, start : start + call["chunk_len"]]) <= 1e-4, index
        start += call["chunk_len"]


def test_chunked_session_pads_the_first_hop_like_the_official_stream(official_model):
    """push/finish of a chunked voice session: the first call after 25 + pad + 3 codes (pad = 13 fills the
    37-code prompt's chunk), then every 25 codes; the closing call stays chunk-causal (the official tts closes
    with full attention instead: ``step(..., chunked=False)`` does that, see the test above)."""
    inputs, outputs, meta = load_prompt_case("token2wav_prompt_stream_chunked_close_chunked")
    session = official_model.streaming_session(voice=oracle_voice(inputs), chunked=True)
    assert session.first_hop_pad == 13
    chunks = [session.push(code) for code in inputs["token"][0].view(-1, 1)]
    assert [i + 1 for i, c in enumerate(chunks) if c.numel()] == [call["n_tokens"] for call in meta["calls"][:-1]]
    tail = session.finish()
    produced = [c for c in chunks if c.numel()] + [tail]
    assert [c.shape[0] for c in produced] == [call["chunk_len"] for call in meta["calls"]]
    assert max_diff(torch.cat(produced), outputs["speech_concat"][0]) <= 1e-4


def test_web_demo_session_with_a_voice(official_model):
    inputs, outputs, meta = load_prompt_case("token2wav_prompt_hop15")
    session = official_model.streaming_session(voice=oracle_voice(inputs))
    audio = torch.cat([session.push(inputs["token"][0]), session.finish()])
    assert max_diff(audio, outputs["speech_concat"][0]) <= 1e-4


def test_chunked_stream_equals_the_whole_chunk_causal_reply(official_model):
    """Where the official stream equals its offline run (the chunk-causal flow over the whole reply, every call
    ending on a chunk boundary thanks to the pad), the cached voice session does too, sample for sample."""
    inputs, outputs, _ = load_prompt_case("flow_prompt_chunked")
    session = official_model.streaming_session(voice=oracle_voice(inputs), chunked=True)
    streamed = torch.cat([session.push(inputs["token"][0]), session.finish()])
    with torch.inference_mode():
        whole, _ = official_model.hift(outputs["mel"], finalize=True)
    assert max_diff(streamed, whole[0]) <= 1e-4


def test_the_prompt_is_encoded_once_per_voice(official_model):
    """A chunked session starts from the voice's cached prompt chunks (the 37-code prompt's first 50-frame chunk
    is reply-independent); replies never change the voice's cache."""
    inputs, _, _ = load_prompt_case("flow_prompt_chunked")
    voice = oracle_voice(inputs)
    official_model.prepare_voice(voice)  # at registration: the prompt chunks are encoded here, once
    cached = official_model._conditioning(voice=voice)._prompt_cache
    assert cached.frames == 50
    first = official_model.streaming_session(voice=voice, chunked=True)
    assert first.flow_cache.frames == 50 and first.flow_cache.steps[0].layers[0][0] is cached.steps[0].layers[0][0]
    keys_before = [layer[0].clone() for layer in cached.steps[0].layers]
    frames = []
    hook = official_model.flow.estimator.register_forward_hook(lambda m, args, out: frames.append(args[0].shape[2]))
    try:
        audio_first = torch.cat([first.push(inputs["token"][0]), first.finish()])
        second = official_model.streaming_session(voice=voice, chunked=True)
        audio_second = torch.cat([second.push(inputs["token"][0]), second.finish()])
    finally:
        hook.remove()
    assert torch.equal(audio_first, audio_second)
    assert cached.frames == 50 and all(torch.equal(a, b[0]) for a, b in zip(keys_before, cached.steps[0].layers))
    # no Euler step of a reply reruns the cached prompt chunk: the widest call is the first hop's new frames
    assert max(frames) <= 2 * (37 + 13 + 25 + 3) - 50
