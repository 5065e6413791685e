"""One speech-to-speech decode step as two compiled regions (what generate() runs) vs fewer (random weights, fp32,
CPU).

A step is: the LLM forward on the fused input, the Speech Refined Head's group of k sub-steps with code selection
(``decode_static_group``), the greedy text token, its embedding and the next fused input
((text embedding + discrete encoder(group)) / 2). generate() compiles the LLM forward (transformers'
``get_compiled_call``) and the SRH group (``compile_static_group``) as two regions and runs the rest eagerly. This
script times that, side by side on the same model, caches and inputs, at batch 1 and batch 8 (the bench model of
``bench_generate.py``, a 41-token prompt), against:

* "LLM + group region": the LLM forward and the SRH group as one ``torch.compile(fullgraph=True)`` region. This is
  the part of a step generate() could fuse: the group is conditioned on the text embedding fed to this step, known
  before the forward, while the text token after it goes through logits processors, stopping criteria and
  streamers in Python.
* "one region": the whole step, greedy text token and next input included, as one region (an upper bound for
  fusing; generate() cannot run its logits processors inside it).

Prints, per batch size, each variant's median step time (repeats alternate the variants) and two regions /
variant; it checks that every variant produces the same codes and text tokens (greedy), so the times are of the
same work.

Usage: python benchmarks/bench_fused_step.py [--steps 60] [--repeats 3] [--threads 2] [--batch-sizes 1 8]
    [--backend inductor]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_configs import ABOS, bench_model_config
from transformers import CompileConfig, StaticCache

from fun_audio_chat import FunAudioChatForConditionalGeneration
from fun_audio_chat.modeling.speech_decoding import SpeechDecoder
from fun_audio_chat.modeling.speech_head import compile_static_group, decode_static_group

PROMPT_LENGTH = 41


class StepState:
    """An LLM static cache and a static SRH decoder after a prompt's prefill, with the first step's inputs."""

    def __init__(self, model, batch: int, steps: int):
        self.model = model
        generation_config = model.generation_config
        generation_config.speech_do_sample = False
        self.speech = SpeechDecoder(model, generation_config, CompileConfig())
        prompt = torch.full((batch, PROMPT_LENGTH), 11)
        prompt[:, -1] = ABOS
        self.cache = StaticCache(config=model.config, max_cache_len=PROMPT_LENGTH + steps + 1)
        embed = model.get_input_embeddings()
        with torch.no_grad():
            out = model(
                input_ids=prompt,
                past_key_values=self.cache,
                cache_position=torch.arange(PROMPT_LENGTH),
                use_cache=True,
                return_last_hidden_state=True,
                compute_speech_logits=False,
                return_dict=True,
            )
            prompt_embeds = embed(prompt)
            self.speech.start(prompt, prompt_embeds, None, PROMPT_LENGTH, steps)
            codes = self.speech.decode_group(out.last_hidden_state, prompt_embeds)
            tokens = out.logits[:, -1].argmax(-1)
            self.text_embeds = embed(tokens)[:, None]
            self.next_embeds = (self.text_embeds + model.audio_tower(codes)) / 2
        self.previous_code = self.speech.previous_code
        self.position = PROMPT_LENGTH

    def group_inputs(self):
        decoder = self.speech.decoder
        return decoder.cache, decoder.positions, decoder.rotary, decoder.key_mask, self.speech.settings


def llm_forward(model, embeds, cache, position):
    return model(
        inputs_embeds=embeds,
        past_key_values=cache,
        cache_position=position,
        use_cache=True,
        return_last_hidden_state=True,
        compute_speech_logits=False,
        return_dict=True,
    )


def llm_then_group(llm, group, model, cache, embeds, position, text_embeds, previous_code, srh_cache, *srh_layout):
    """The LLM forward, then the SRH group conditioned on its last state plus the text embedding fed to this step
    (known before the forward, so this part needs no text token). ``llm`` and ``group`` are the plain functions or
    their compiled versions. Returns the LLM logits and the group's codes."""
    out = llm(model, embeds, cache, position)
    conditioned = out.last_hidden_state + text_embeds
    codes, _, _ = group(model.audio_invert_tower, srh_cache, conditioned, previous_code, None, None, *srh_layout)
    return out.logits, codes


def next_inputs(model, logits, codes):
    """The greedy text token, its embedding and the next fused LLM input: the rest of a step."""
    tokens = logits[:, -1].argmax(-1)
    next_text_embeds = model.get_input_embeddings()(tokens)[:, None]
    next_embeds = (next_text_embeds + model.audio_tower(codes)) / 2
    return next_embeds, next_text_embeds, codes, tokens


def whole_step(*inputs):
    """The whole step as plain code (compiled as one region)."""
    return next_inputs(inputs[0], *llm_then_group(llm_forward, decode_static_group, *inputs))


def llm_and_group(*inputs):
    """The LLM forward and the SRH group as plain code (compiled as one region)."""
    return llm_then_group(llm_forward, decode_static_group, *inputs)


def llm_and_group_step(compiled_part):
    def step(*inputs):
        return next_inputs(inputs[0], *compiled_part(*inputs))

    return step


def two_region_step(compiled_llm, compiled_group):
    def step(*inputs):
        return next_inputs(inputs[0], *llm_then_group(compiled_llm, compiled_group, *inputs))

    return step


def run_steps(model, step_fn, batch: int, steps: int) -> tuple[list[float], torch.Tensor, torch.Tensor]:
    """Step times (s) after the first two, and every step's codes and tokens."""
    state = StepState(model, batch, steps)
    srh = state.group_inputs()
    times, all_codes, all_tokens = [], [], []
    embeds, text_embeds, previous_code = state.next_embeds, state.text_embeds, state.previous_code
    with torch.no_grad():
        for index in range(steps):
            position = torch.tensor([state.position + index])
            start = time.perf_counter()
            embeds, text_embeds, codes, tokens = step_fn(
                model, state.cache, embeds, position, text_embeds, previous_code, *srh
            )
            previous_code = codes[:, -1].contiguous()
            times.append(time.perf_counter() - start)
            all_codes.append(codes)
            all_tokens.append(tokens)
    return times[2:], torch.stack(all_codes, 1), torch.stack(all_tokens, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--backend", default="inductor", help="torch.compile backend ('eager': trace only, fast)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = FunAudioChatForConditionalGeneration(bench_model_config()).eval()

    # dynamic=False as CompileConfig's default: each batch size gets its own static graph (dynamo would otherwise
    # switch to a dynamic batch dimension at the second size).
    settings = {"fullgraph": True, "dynamic": False, "backend": args.backend}
    compiled_llm = torch.compile(llm_forward, **settings)
    compiled_group = compile_static_group(CompileConfig(backend=args.backend))
    variants = {
        "two regions (generate)": two_region_step(compiled_llm, compiled_group),
        "one region": torch.compile(whole_step, **settings),
        "LLM + group region": llm_and_group_step(torch.compile(llm_and_group, **settings)),
    }
    print(
        f"torch {torch.__version__}, backend {args.backend}, {args.threads} threads, {args.steps} steps, "
        f"median of {args.repeats} runs"
    )
    for batch in args.batch_sizes:
        first_use = {}
        for name, step_fn in variants.items():
            start = time.perf_counter()
            run_steps(model, step_fn, batch, 4)  # compiles (first use of this batch size)
            first_use[name] = time.perf_counter() - start
        # Repeats alternate the variants, so a drift in the machine's speed reaches them all alike.
        runs = {name: [] for name in variants}
        reference = None
        for _ in range(args.repeats):
            for name, step_fn in variants.items():
                times, codes, tokens = run_steps(model, step_fn, batch, args.steps)
                runs[name].append(statistics.median(times))
                if reference is None:
                    reference = (codes, tokens)
                elif not (torch.equal(reference[0], codes) and torch.equal(reference[1], tokens)):
                    raise SystemExit(f"{name} produced different codes or tokens than the two-region step")
        medians = {name: statistics.median(times) for name, times in runs.items()}
        for name in variants:
            print(f"batch {batch}: {name:24s} {1000 * medians[name]:7.2f} ms/step (first use {first_use[name]:.0f} s)")
        two = medians["two regions (generate)"]
        for name in list(variants)[1:]:
            print(f"batch {batch}: two regions / {name} = {two / medians[name]:.2f}x (same codes and tokens)")


if __name__ == "__main__":
    main()
