"""DRSR grouping: training-step time with group size 5 vs an ungrouped (group size 1) model of the same width.

The method's claim (docs/official-format.md#method): running the LLM at 5 Hz instead of 25 Hz for speech roughly halves training
compute. Both models here have the same widths and depths (random weights, fp32, CPU); only
``audio_config.group_size`` differs. Each training example is a text prompt and a spoken reply of the same
length in 25 Hz speech codes (10 speech-BOS delay codes + ``--seconds`` x 25 codes, transcript in ``text_ids``),
laid out as in training (docs/official-format.md#training-forward). With k = 5 the reply takes ceil(codes / 5) LLM positions, with k = 1 one
position per code; the Speech Refined Head decodes all 25 Hz codes in both cases.

One step = forward (text + speech losses) + backward. The two models' steps alternate (after two warm-up steps
each) so that a busy machine slows both alike. Prints the median step times, the LLM / SRH sequence lengths
and the median ratio ungrouped / grouped.

Then, at two LLM widths (512 and 1024, same depth; the SRH keeps its size), the training step of the full model
(k = 5) against a plain Qwen3 causal LM built from the same text config on the same positions and text targets: the
cost of the speech stack (discrete speech encoder, transcript merge, Speech Refined Head with its loss). The
prompts have no user audio, so the continuous audio encoder does not run. Also the full model's step under
``training_recipe="consistent"`` (default) against ``"official"``: the cost of decoding the prompt's last SRH
sub-steps before the teacher-forced pass.

Config: text Qwen3 hidden 512, 8 layers, 8 heads, 4 kv heads, head_dim 64, intermediate 1536, vocab 4096;
SRH hidden 256, 4 layers, intermediate 768; codebook 6565.

Usage: python benchmarks/bench_drsr.py [--seconds 20] [--batch 2] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from bench_configs import ABOS, AEOS, AUDIO, IM_END, IM_START, NEWLINE, bench_model_config

from fun_audio_chat import FunAudioChatConfig, FunAudioChatForConditionalGeneration

SYSTEM, USER, ASSISTANT = 10, 11, 12
SPEECH_BOS, SPEECH_EOS, SPEECH_PAD = 6561, 6562, 6563
SPEECH_DELAY = 10  # speech-BOS codes before the reply's first real code (docs/official-format.md#delay-tokens)
LLM_POSITIONS_NOTE = "same LLM positions and text targets for both, median of alternating repeats"


def bench_config(group_size: int, width: int = 512) -> FunAudioChatConfig:
    """The shared benchmark model with a minimal audio encoder (the DRSR comparison never runs it)."""
    return bench_model_config(width, group_size, encoder_width=128, encoder_layers=1, encoder_ffn_dim=256)


def make_batch(group_size: int, seconds: float, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``batch`` identical-length spoken replies to a 40-token text prompt."""
    gen = torch.Generator().manual_seed(seed)
    codes = int(seconds * 25)
    speech_len = SPEECH_DELAY + codes
    slots = math.ceil(speech_len / group_size)
    transcript = max(1, int(seconds * 3))  # ~3 text tokens per second of speech
    rows, labels = [], []
    for _ in range(batch):
        system = torch.randint(100, 400, (12,), generator=gen).tolist()
        user = torch.randint(100, 400, (20,), generator=gen).tolist()
        prompt = [
            IM_START,
            SYSTEM,
            NEWLINE,
            *system,
            IM_END,
            NEWLINE,
            IM_START,
            USER,
            NEWLINE,
            *user,
            IM_END,
            NEWLINE,
            IM_START,
            ASSISTANT,
            NEWLINE,
        ]
        reply = [ABOS, *([AUDIO] * slots), AEOS, IM_END, NEWLINE]
        rows.append(prompt + reply)
        labels.append([-100] * len(prompt) + reply)
    speech = torch.cat(
        [torch.full((batch, SPEECH_DELAY), SPEECH_BOS), torch.randint(0, 6561, (batch, codes), generator=gen)], dim=1
    )
    return {
        "input_ids": torch.tensor(rows),
        "attention_mask": torch.ones(len(rows), len(rows[0]), dtype=torch.long),
        "labels": torch.tensor(labels),
        "speech_ids": speech,
        "speech_attention_mask": torch.ones_like(speech),
        "text_ids": torch.randint(100, 400, (batch, transcript), generator=gen),
        "text_attention_mask": torch.ones(batch, dtype=torch.bool),
        "feature_exist_mask": torch.zeros(batch, dtype=torch.bool),
    }


def train_step(model, batch) -> float:
    for p in model.parameters():
        p.grad = None
    start = time.perf_counter()
    out = model(**batch)
    out.loss.backward()
    return time.perf_counter() - start


def plain_llm_step(llm, batch) -> float:
    for p in llm.parameters():
        p.grad = None
    start = time.perf_counter()
    out = llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["text_labels"])
    out.loss.backward()
    return time.perf_counter() - start


def alternate(steps: dict, repeats: int) -> dict[str, list[float]]:
    """Two warm-up calls each, then ``repeats`` rounds calling every step in turn; returns the times."""
    for step in steps.values():
        for _ in range(2):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(step())
    return times


def speech_stack_cost(width: int, args) -> None:
    """Full model vs a plain Qwen3 of the same text config, and the consistent vs the official recipe."""
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(0)
    model = FunAudioChatForConditionalGeneration(bench_config(5, width)).train()
    llm = Qwen3ForCausalLM(model.config.text_config).train()
    batch = make_batch(5, args.seconds, args.batch)
    layout = model.audio_layout(
        batch["input_ids"], batch["speech_ids"], batch["speech_attention_mask"], batch["text_ids"]
    )
    plain = {**batch, "text_labels": model.build_text_labels(batch["labels"], layout, batch["text_attention_mask"])}

    def full(recipe):
        def step():
            model.config.training_recipe = recipe
            return train_step(model, batch)

        return step

    times = alternate(
        {"full": full("consistent"), "official": full("official"), "qwen3": lambda: plain_llm_step(llm, plain)},
        args.repeats,
    )
    stack = [f / q for f, q in zip(times["full"], times["qwen3"])]
    recipe = [f / o for f, o in zip(times["full"], times["official"])]
    full_params = sum(p.numel() for p in model.parameters()) / 1e6
    llm_params = sum(p.numel() for p in llm.parameters()) / 1e6
    print(
        f"width {width}: full model {full_params:.1f}M params {statistics.median(times['full']) * 1000:8.1f} ms | "
        f"plain Qwen3 {llm_params:.1f}M params {statistics.median(times['qwen3']) * 1000:8.1f} ms | "
        f"ratio full / Qwen3 {statistics.median(stack):.2f}x (range {min(stack):.2f}-{max(stack):.2f}) | "
        f"consistent / official recipe {statistics.median(recipe):.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="assistant speech length (25 Hz codes)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is the most stable on a shared CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    setups = {}
    for k in (5, 1):
        torch.manual_seed(0)
        model = FunAudioChatForConditionalGeneration(bench_config(k)).train()
        setups[k] = (model, make_batch(k, args.seconds, args.batch))
        for _ in range(2):  # warm-up
            train_step(*setups[k])
    # Alternate the two models step by step so that load changes on a shared machine hit both alike.
    times: dict[int, list[float]] = {5: [], 1: []}
    for _ in range(args.repeats):
        for k in (5, 1):
            times[k].append(train_step(*setups[k]))
    ratios = [t1 / t5 for t5, t1 in zip(times[5], times[1])]
    for k in (5, 1):
        model, batch = setups[k]
        llm_len = batch["input_ids"].shape[1]
        print(
            f"group size {k}: LLM positions {llm_len:5d}, SRH positions {llm_len * k:5d}, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
            f"step (fwd+bwd) median {statistics.median(times[k]) * 1000:8.1f} ms"
        )
    print(
        f"assistant speech {args.seconds:g} s ({int(args.seconds * 25)} codes), batch {args.batch}, "
        f"threads {torch.get_num_threads()}, {args.repeats} alternating repeats"
    )
    print(
        f"ratio ungrouped (k=1) / grouped (k=5) step time: {statistics.median(ratios):.2f}x "
        f"(median of per-repeat ratios; range {min(ratios):.2f}-{max(ratios):.2f})"
    )
    print(f"training step (fwd+bwd), {LLM_POSITIONS_NOTE}:")
    for width in (512, 1024):
        speech_stack_cost(width, args)


if __name__ == "__main__":
    main()
