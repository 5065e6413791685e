"""Decode-loop efficiency of FunAudioChatForConditionalGeneration.generate (random weights, fp32, CPU).

Config (issue 3): text Qwen3 hidden 512, 8 layers, 8 heads, 4 kv heads, head_dim 64, intermediate 1536, vocab 4096;
audio encoder d_model 256, 4 layers, ffn 1024; SRH hidden 256, 4 layers, 4 heads, 2 kv heads, head_dim 64,
intermediate 768; codebook 6565, group 5; a 4 s user clip (41-token prompt); 100 new tokens, force_audio_bos,
greedy. Prints, from one run:

(a) speech-to-speech decode step time / the time of that step's weight matmuls alone (the floor);
(b) batch-8 speech tokens/s / batch-1 speech tokens/s;
(c) decode steps after the prefill before the first speech group reaches the streamer;
(d) speech-to-text decode step time / its floor.

Usage: python benchmarks/bench_generate.py [--new-tokens 100] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fun_audio_chat import FunAudioChatConfig, FunAudioChatForConditionalGeneration

ABOS, AEOS, AUDIO, SIL = 4090, 4091, 4089, 4093


def bench_config() -> FunAudioChatConfig:
    return FunAudioChatConfig(
        text_config={
            "model_type": "qwen3", "vocab_size": 4096, "hidden_size": 512, "num_hidden_layers": 8,
            "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64, "intermediate_size": 1536,
            "max_position_embeddings": 4096, "tie_word_embeddings": False, "eos_token_id": 4095,
            "pad_token_id": 4094, "audio_bos_index": ABOS, "audio_eos_index": AEOS, "sil_index": SIL,
        },
        audio_config={
            "d_model": 256, "encoder_layers": 4, "encoder_attention_heads": 4, "encoder_ffn_dim": 1024,
            "output_dim": 512, "codebook_size": 6565, "group_size": 5,
            "crq_transformer_config": {
                "model_type": "qwen3", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 64, "intermediate_size": 768, "vocab_size": 16,
                "max_position_embeddings": 8192,
            },
        },
        audio_token_index=AUDIO,
    )


def prompt_inputs(batch: int, seconds: float = 4.0) -> dict[str, torch.Tensor]:
    frames = int(seconds * 100)  # 10 ms mel hop
    speech_frames = int(seconds * 25)
    placeholders = -(-speech_frames // 5)
    text = [11] * 10 + [ABOS - 3] + [ABOS] + [AUDIO] * placeholders + [AEOS] + [12] * (41 - placeholders - 13)
    ids = torch.tensor([text] * batch)
    padded = -(-speech_frames // 5) * 5
    generator = torch.Generator().manual_seed(0)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "input_features": (0.6 * torch.randn(batch, 128, frames, generator=generator)).clamp(-1.5, 1.5),
        "feature_attention_mask": torch.ones(batch, frames, dtype=torch.long),
        "feature_exist_mask": torch.ones(batch, dtype=torch.bool),
        "speech_ids": torch.full((batch, padded), 6563),
        "speech_attention_mask": (torch.arange(padded) < speech_frames).long().expand(batch, -1).clone(),
    }


def matmul_floor_seconds(model, batch: int, with_speech: bool, repeats: int = 50) -> float:
    """Time of one decode step's weight matmuls alone (same shapes, no attention/norm/sampling overhead)."""
    weights = [m.weight for m in model.language_model.modules() if isinstance(m, torch.nn.Linear)]
    plan = [(torch.randn(batch, w.shape[1]), w) for w in weights]
    if with_speech:
        head = model.audio_invert_tower
        plan.append((torch.randn(batch, head.pre_matching.weight.shape[1]), head.pre_matching.weight))
        plan.append((torch.randn(batch, model.audio_tower.output_matching.weight.shape[1]),
                     model.audio_tower.output_matching.weight))
        sub_weights = [m.weight for m in head.crq_transformer.modules() if isinstance(m, torch.nn.Linear)]
        sub_weights += [head.input_matching.weight, head.output_matching.weight, head.lm_head.weight]
        for _ in range(model.group_size):
            plan.extend((torch.randn(batch, w.shape[1]), w) for w in sub_weights)
    with torch.no_grad():
        for x, w in plan:
            x @ w.T
        timings = []
        for _ in range(repeats):
            start = time.perf_counter()
            for x, w in plan:
                x @ w.T
            timings.append(time.perf_counter() - start)
    return statistics.median(timings)


class StepClock:
    """Streamer that timestamps every step and notes when the first speech group arrives."""

    def __init__(self):
        self.times = []
        self.first_speech_step = None
        self._prompt = True

    def put(self, value):
        if self._prompt:
            self._prompt = False
            return
        self.times.append(time.perf_counter())

    def put_speech(self, codes, rows):
        if self.first_speech_step is None:
            self.first_speech_step = len(self.times) - 1  # 0 = the prefill's step

    def end(self):
        pass

    def decode_step_seconds(self) -> float:
        gaps = [b - a for a, b in zip(self.times, self.times[1:])]
        return statistics.median(gaps[2:]) if len(gaps) > 4 else statistics.median(gaps)


def run(model, batch, new_tokens, return_speech, streamer=None):
    inputs = prompt_inputs(batch)
    with torch.no_grad():
        start = time.perf_counter()
        out = model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            return_speech=return_speech, force_audio_bos=True, speech_do_sample=False,
            return_dict_in_generate=True, streamer=streamer,
        )
        elapsed = time.perf_counter() - start
    return out, elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = FunAudioChatForConditionalGeneration(bench_config()).eval()

    run(model, 1, 5, True)  # warm-up
    s2s_steps, s2t_steps, first_speech, b1_rates, b8_rates = [], [], [], [], []
    for _ in range(args.repeats):
        clock = StepClock()
        out, elapsed = run(model, 1, args.new_tokens, True, clock)
        s2s_steps.append(clock.decode_step_seconds())
        first_speech.append(clock.first_speech_step)
        b1_rates.append(int(out.speech_attention_mask.sum()) / elapsed)
        out8, elapsed8 = run(model, 8, args.new_tokens, True)
        b8_rates.append(int(out8.speech_attention_mask.sum()) / elapsed8)
        clock = StepClock()
        run(model, 1, args.new_tokens, False, clock)
        s2t_steps.append(clock.decode_step_seconds())

    s2s_floor = matmul_floor_seconds(model, 1, with_speech=True)
    s2t_floor = matmul_floor_seconds(model, 1, with_speech=False)
    s2s, s2t = statistics.median(s2s_steps), statistics.median(s2t_steps)
    print(f"threads={args.threads} new_tokens={args.new_tokens} repeats={args.repeats}")
    print(f"(a) S2S decode step {s2s * 1e3:.2f} ms / matmul floor {s2s_floor * 1e3:.2f} ms = {s2s / s2s_floor:.2f}x")
    print(f"(b) speech tokens/s batch 8 {statistics.median(b8_rates):.0f} / batch 1 {statistics.median(b1_rates):.0f}"
          f" = {statistics.median(b8_rates) / statistics.median(b1_rates):.2f}x")
    print(f"(c) first speech group reaches the streamer {min(first_speech)} decode step(s) after the prefill")
    print(f"(d) S2T decode step {s2t * 1e3:.2f} ms / matmul floor {s2t_floor * 1e3:.2f} ms = {s2t / s2t_floor:.2f}x")


if __name__ == "__main__":
    main()
