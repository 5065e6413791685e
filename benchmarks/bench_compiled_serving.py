"""The serving decoder's step, default (dynamic caches) vs compiled (fixed cache slots), at batch 1 and 8 (random
weights, fp32, CPU).

``ContinuousBatchDecoder`` decodes one LLM step and one Speech Refined Head group for every row per ``step()``. By
default its caches are dynamic and every step runs the model eagerly; with a ``CompileConfig`` every row owns a
fixed cache slot and the LLM step and the SRH sub-step run as compiled graphs, one per batch bucket (1, 2, 4, ...,
``slots``; ``slot_batching.py``), compiled by ``warm_up()`` before the first row. This script adds B greedy
speech-to-speech rows (the bench model and 4 s / 41-token prompt of ``bench_generate.py``; the audio-BOS forced,
greedy text and codes, a fixed number of new tokens) to each decoder and times its steady-state ``step()`` calls:
all rows joined, none leaving (the first call, where the prefilled rows join, and the last, where they leave, are
left out). Repeats alternate the two decoders, medians are taken over the repeats.

Prints the compiled decoder's warm-up time (every bucket compiled), then per batch size each decoder's median ms per
step and compiled / default; then for each decoder the batch-B / batch-1 throughput ratio (B x t1 / tB: how much
more speech a step of B rows yields than B steps of one row). It checks that both decoders produce the same text
tokens and speech codes for every row, so the times are of the same work, and stops with an error otherwise.

Usage: python benchmarks/bench_compiled_serving.py [--batch-sizes 1 8] [--max-new-tokens 60] [--repeats 3]
    [--threads 2] [--backend inductor] [--context N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from bench_configs import bench_model_config
from bench_generate import prompt_inputs
from transformers import CompileConfig

from fun_audio_chat import FunAudioChatForConditionalGeneration
from fun_audio_chat.modeling import ContinuousBatchDecoder

GREEDY_SPEECH = {"do_sample": False, "speech_do_sample": False, "force_audio_bos": True}


def serve(decoder: ContinuousBatchDecoder, batch: int, new_tokens: int) -> tuple[list[float], list]:
    """Add ``batch`` rows, step until they all finish; returns the steady-state step times (s) and, per row, its
    text tokens and speech codes."""
    inputs = prompt_inputs(1)
    # min_new_tokens: every row decodes the same number of steps (random weights may pick an end token early).
    settings = {**GREEDY_SPEECH, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    rows = {decoder.add(inputs, **settings): ([], []) for _ in range(batch)}
    times = []
    while decoder.has_rows:
        start = time.perf_counter()
        steps = decoder.step()
        times.append(time.perf_counter() - start)
        for step in steps:
            tokens, codes = rows[step.row_id]
            tokens.append(step.token_id)
            if step.speech_group is not None:
                codes.extend(step.speech_group.tolist())
    if len(times) < 3:
        raise SystemExit(f"--max-new-tokens {new_tokens}: too few steps to time (at least 3 needed)")
    # The first call joins the prefilled rows (its RowSteps are their prefill steps), the last one lets them leave.
    return times[1:-1], list(rows.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-new-tokens", "--steps", type=int, default=60, dest="max_new_tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend ('eager': trace only, fast)")
    parser.add_argument(
        "--context",
        type=int,
        default=None,
        help="LLM positions of a compiled slot (default: prompt + new tokens, the tightest; serve --compile's "
        "default is 2048): attention spans the whole slot, so a larger context costs every step",
    )
    args = parser.parse_args()
    if min(args.batch_sizes) < 1:
        parser.error("--batch-sizes must be >= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = FunAudioChatForConditionalGeneration(bench_model_config()).eval()

    prompt_length = prompt_inputs(1)["input_ids"].shape[1]
    slots = max(args.batch_sizes)
    context = args.context or prompt_length + args.max_new_tokens
    if context < prompt_length + args.max_new_tokens:
        parser.error(f"--context must hold the prompt and the reply ({prompt_length + args.max_new_tokens})")
    compiled = ContinuousBatchDecoder(model, CompileConfig(backend=args.backend), slots=slots, context=context)
    start = time.perf_counter()
    buckets = compiled.warm_up()
    warm_up = time.perf_counter() - start
    print(
        f"torch {torch.__version__}, backend {args.backend}, {args.threads} threads, {prompt_length}-token prompt, "
        f"{args.max_new_tokens} new tokens, median of {args.repeats} alternated runs; load average "
        f"{os.getloadavg()[0]:.2f} (another busy process slows the eager steps most)"
    )
    print(
        f"compiled warm-up ({slots} slots of {context} positions, buckets {', '.join(map(str, buckets))}): {warm_up:.1f} s ("
        + ", ".join(f"b{size} {seconds:.1f} s" for size, seconds in buckets.items())
        + ")"
    )

    variants = {"default": lambda: ContinuousBatchDecoder(model), "compiled": lambda: compiled}
    serve(ContinuousBatchDecoder(model), 1, 4)  # warm-up of the eager path (first-call allocations)
    medians = {}
    for batch in args.batch_sizes:
        runs = {name: [] for name in variants}
        reference = None
        for _ in range(args.repeats):
            for name, decoder in variants.items():
                times, rows = serve(decoder(), batch, args.max_new_tokens)
                runs[name].append(statistics.median(times))
                if reference is None:
                    reference = rows
                elif rows != reference:
                    differing = next(index for index, (a, b) in enumerate(zip(rows, reference)) if a != b)
                    raise SystemExit(
                        f"batch {batch}: the {name} decoder's row {differing} produced different text tokens or "
                        "speech codes than the default decoder's"
                    )
        for name in variants:
            medians[name, batch] = statistics.median(runs[name])
        default, fast = medians["default", batch], medians["compiled", batch]
        spread = {name: f"{1000 * min(runs[name]):.1f}-{1000 * max(runs[name]):.1f}" for name in variants}
        print(
            f"batch {batch}: default {1000 * default:.2f} ms/step (runs {spread['default']}), compiled "
            f"{1000 * fast:.2f} ms/step (runs {spread['compiled']}); "
            f"compiled / default = {fast / default:.2f}x (default / compiled = {default / fast:.2f}x; "
            f"same tokens and codes on all {batch} rows)"
        )
    if 1 in args.batch_sizes:
        for batch in args.batch_sizes:
            if batch == 1:
                continue
            ratios = ", ".join(f"{name} {batch * medians[name, 1] / medians[name, batch]:.2f}x" for name in variants)
            print(f"batch {batch} / batch 1 throughput (B x t1 / tB): {ratios}")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
