"""Decode-loop efficiency of FunAudioChatForConditionalGeneration.generate (random weights, fp32, CPU).

Config: text Qwen3 hidden 512, 8 layers, 8 heads, 4 kv heads, head_dim 64, intermediate 1536, vocab 4096;
audio encoder d_model 256, 4 layers, ffn 1024; SRH hidden 256, 4 layers, 4 heads, 2 kv heads, head_dim 64,
intermediate 768; codebook 6565, group 5; a 4 s user clip (41-token prompt); 100 new tokens, force_audio_bos,
greedy. Prints, from one run:

(a) speech-to-speech decode step time / the time of that step's weight matmuls alone (the floor);
(b) batch-8 speech tokens/s / batch-1 speech tokens/s, beside the most the weight matmuls allow (8 x the batch-1
    step's matmul floor / the batch-8 step's: where batching stops being free on this CPU);
(c) decode steps after the prefill before the first speech group reaches the streamer;
(d) speech-to-text decode step time / its floor;

each for the default path and for transformers' compiled-decoding path (``cache_implementation="static"`` plus a
``compile_config`` opted in on CPU with ``_compile_all_devices = True``), the latter with the default SDPA attention
and with ``attn_implementation="eager"``; (e) the compiled paths' first-call time (compilation included); (f) the
peak memory that loading the bench model from disk adds to a process (torch already imported) and the bytes its
weights hold afterwards, in full precision and with the LLM quantized to int8 weights (optimum-quanto; audio
encoders, speech head and speech embeddings stay full precision); (g) the compiled decode step with SDPA over the
same step with eager attention; (h) the first compiled call of a fresh process, cold (empty compile caches) over
warm: torch's compile cache artifacts saved by the cold process loaded first, as ``warm_up_compiled_decoding(...,
cache_path=...)`` does, in a fresh inductor cache directory (a new machine) and in the cold process's one (a
restart on the same machine); (i) with ``--official-code DIR`` (the folder that contains the official
``funaudiochat`` package, github FunAudioLLM/Fun-Audio-Chat, never committed here): the official generate()'s wall
time over ours on the same saved weights and the same batch-1 speech-to-speech prompt (greedy text and speech codes,
the audio-BOS forced, stop at the text EOS), repeats alternated in one run, for the default path and (unless
``--skip-compiled``) the compiled one, and whether the two agree on the text tokens and speech codes. The official
side runs in ``official_generate_worker.py`` under ``--official-python`` (transformers 4.52.3, numpy<2).

Usage: python benchmarks/bench_generate.py [--new-tokens 100] [--repeats 3] [--threads 2] [--skip-compiled]
    [--skip-eager-attention] [--skip-warm-start] [--official-code DIR [--official-python PY] [--only-official]]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_configs import ABOS, AEOS, AUDIO, IM_END, PAD, bench_model_config
from official_generate_worker import official_code_error
from safetensors.torch import save_file
from transformers import CompileConfig

from fun_audio_chat import FunAudioChatForConditionalGeneration


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
        plan.append(
            (
                torch.randn(batch, model.audio_tower.output_matching.weight.shape[1]),
                model.audio_tower.output_matching.weight,
            )
        )
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


def compiled_decoding() -> dict:
    compile_config = CompileConfig()
    compile_config._compile_all_devices = True  # transformers compiles decode steps off GPU only when asked
    return {"cache_implementation": "static", "compile_config": compile_config}


def run(model, batch, new_tokens, return_speech, streamer=None, decoding=None):
    inputs = prompt_inputs(batch)
    with torch.no_grad():
        start = time.perf_counter()
        out = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            return_speech=return_speech,
            force_audio_bos=True,
            speech_do_sample=False,
            return_dict_in_generate=True,
            streamer=streamer,
            **(decoding or {}),
        )
        elapsed = time.perf_counter() - start
    return out, elapsed


def measure(model, new_tokens, repeats, decoding=None) -> dict:
    """Median step times and rates over ``repeats`` runs. The floors are measured between those runs, so a ratio
    compares times taken side by side (on a shared machine a floor measured once drifts by tens of percent)."""
    s2s_steps, s2t_steps, first_speech, b1_rates, b8_rates = [], [], [], [], []
    s2s_floors, s2t_floors, b8_floors = [], [], []
    for _ in range(repeats):
        clock = StepClock()
        out, elapsed = run(model, 1, new_tokens, True, clock, decoding)
        s2s_floors.append(matmul_floor_seconds(model, 1, with_speech=True))
        s2s_steps.append(clock.decode_step_seconds())
        first_speech.append(clock.first_speech_step)
        b1_rates.append(int(out.speech_attention_mask.sum()) / elapsed)
        out8, elapsed8 = run(model, 8, new_tokens, True, None, decoding)
        b8_floors.append(matmul_floor_seconds(model, 8, with_speech=True))
        b8_rates.append(int(out8.speech_attention_mask.sum()) / elapsed8)
        clock = StepClock()
        run(model, 1, new_tokens, False, clock, decoding)
        s2t_floors.append(matmul_floor_seconds(model, 1, with_speech=False))
        s2t_steps.append(clock.decode_step_seconds())
    return {
        "s2s": statistics.median(s2s_steps),
        "s2t": statistics.median(s2t_steps),
        "s2s_floor": statistics.median(s2s_floors),
        "s2t_floor": statistics.median(s2t_floors),
        "b8_floor": statistics.median(b8_floors),
        "b1": statistics.median(b1_rates),
        "b8": statistics.median(b8_rates),
        "first_speech": min(first_speech),
    }


LOAD_PEAK = """
import sys, torch
from transformers import QuantoConfig
from fun_audio_chat import FunAudioChatForConditionalGeneration

def stored_bytes(tensor):
    # quanto's weights are tensor subclasses whose dtype and element_size() claim float32 (what
    # get_memory_footprint() counts); the bytes really held are those of their inner tensors (int8 data, scales).
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(stored_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()

def status_kb(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

# Importing the stack peaks higher than loading a small model: reset the peak (Linux) so it measures the load only.
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")
before_load = status_kb("VmRSS")
kwargs = {"quantization_config": QuantoConfig(weights="int8")} if sys.argv[2] == "int8" else {}
model = FunAudioChatForConditionalGeneration.from_pretrained(sys.argv[1], **kwargs)
held = sum(stored_bytes(t) for t in [*model.parameters(), *model.buffers()])
print(status_kb("VmHWM") - before_load, held)
"""


def load_peak_megabytes(folder: str, mode: str) -> tuple[float, float] | None:
    """(peak resident memory added by the load, bytes the weights hold afterwards) in MB, in a fresh process that
    loads the saved bench model after importing torch and transformers."""
    done = subprocess.run([sys.executable, "-c", LOAD_PEAK, folder, mode], capture_output=True, text=True)
    if done.returncode != 0:
        return None
    peak_kb, held_bytes = done.stdout.split()[-2:]
    return int(peak_kb) / 1024, int(held_bytes) / 2**20


FIRST_COMPILED_CALL = """
import sys, time, torch
sys.path.insert(0, sys.argv[1])
from bench_configs import bench_model_config
from bench_generate import compiled_decoding, run
from fun_audio_chat import FunAudioChatForConditionalGeneration
from fun_audio_chat.modeling.compiled_decoding import load_compile_cache, save_compile_cache

torch.set_num_threads(int(sys.argv[3]))
torch.manual_seed(0)
model = FunAudioChatForConditionalGeneration(bench_model_config()).eval()
start = time.perf_counter()
loaded = load_compile_cache(sys.argv[2])
run(model, 1, int(sys.argv[4]), True, None, compiled_decoding())
elapsed = time.perf_counter() - start
if not loaded:
    save_compile_cache(sys.argv[2])
print(elapsed)
"""


def first_compiled_call_seconds(threads: int, new_tokens: int) -> dict[str, float] | None:
    """Seconds of a fresh process's first compiled S2S call (cache loading included), three ways:

    * ``cold``: empty caches;
    * ``artifacts``: a new machine or container: an empty inductor cache directory, the compile cache artifacts the
      cold process saved loaded first (inductor still builds the C++ of its CPU kernels from the loaded source);
    * ``same machine``: a restart on the machine that compiled: the cold process's inductor cache directory (with
      its built kernels) kept, plus the artifacts.
    """
    here = str(Path(__file__).resolve().parent)
    seconds = {}
    with tempfile.TemporaryDirectory() as folder:
        artifacts = os.path.join(folder, "compile-cache.bin")
        for attempt, inductor_dir in (("cold", "cold"), ("artifacts", "fresh"), ("same machine", "cold")):
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": os.path.join(folder, f"inductor-{inductor_dir}")}
            done = subprocess.run(
                [sys.executable, "-c", FIRST_COMPILED_CALL, here, artifacts, str(threads), str(new_tokens)],
                capture_output=True,
                text=True,
                env=env,
            )
            if done.returncode != 0:
                print(done.stderr[-2000:], file=sys.stderr)
                return None
            seconds[attempt] = float(done.stdout.split()[-1])
    return seconds


# The decoding both sides of (i) run: what the official code does with text_greedy, only_crq_sampling and
# force_text_abos (greedy text and codes, no logits processors, stop at the text EOS).
OFFICIAL_LIKE_DECODING = {
    "do_sample": False,
    "force_audio_bos": True,
    "return_speech": True,
    "speech_do_sample": False,
    "speech_repetition_penalty": 1.0,
    "eos_token_id": IM_END,
    "pad_token_id": PAD,
}


class OfficialWorker:
    """The official generate() in a subprocess (``official_generate_worker.py``) that loads the model once."""

    def __init__(self, python: str, official_code: str, model_folder: str, inputs_file: str, args):
        worker = Path(__file__).resolve().parent / "official_generate_worker.py"
        command = [python, str(worker), "--official-code", official_code, "--model", model_folder]
        command += ["--inputs", inputs_file, "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
        command += ["--eos-token-id", str(IM_END), "--pad-token-id", str(PAD)]
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True
        )
        self._reply()  # {"ready": true} once the model is loaded

    def _reply(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            self.stderr.seek(0)
            lines = [line for line in self.stderr.read().splitlines() if line.strip()]
            reason = lines[-1] if lines else f"exit status {self.process.returncode}"
            raise SystemExit(f"bench_generate.py: error: the official generate worker failed: {reason}")
        return json.loads(line)

    def generate(self) -> dict:
        self.process.stdin.write("generate\n")
        self.process.stdin.flush()
        return self._reply()

    def close(self):
        try:
            self.process.stdin.close()
        except BrokenPipeError:
            pass  # the worker has already ended; _reply reported why
        self.process.wait()
        self.stderr.close()


def agreement(ours: tuple[torch.Tensor, torch.Tensor], official: dict) -> str:
    """Whether our (sequences, speech_ids) equal the official ones, and where they first part if not."""
    found = []
    for name, mine, theirs in (
        ("text tokens", ours[0][0].tolist(), official["sequences"][0]),
        ("speech codes", ours[1][0].tolist(), official["speech_ids"][0]),
    ):
        if mine == theirs:
            found.append(f"{name} agree ({len(mine)})")
        else:
            first = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
            found.append(f"{name} DIFFER (ours {len(mine)}, official {len(theirs)}, first difference at {first})")
    return ", ".join(found)


def compare_with_official(model, args) -> None:
    """(i): the official generate()'s wall time over ours, repeats alternated, on the same weights and inputs."""
    inputs = prompt_inputs(1)
    paths = {"default": {}} if args.skip_compiled else {"default": {}, "compiled": compiled_decoding()}
    with tempfile.TemporaryDirectory() as folder:
        model_folder, inputs_file = os.path.join(folder, "model"), os.path.join(folder, "inputs.safetensors")
        model.save_pretrained(model_folder)
        save_file(inputs, inputs_file)
        worker = OfficialWorker(args.official_python, args.official_code, model_folder, inputs_file, args)
        try:
            worker.generate()  # warm-up
            ours_seconds = {name: [] for name in paths}
            official_seconds, checks = [], {}
            with torch.no_grad():
                # Sections (e)-(h) left compiled entries for other models and settings: start from an empty cache so
                # the compiled path's first call here compiles afresh instead of hitting torch's recompile limit.
                torch._dynamo.reset()
                for decoding in paths.values():  # warm-up (compilation for the compiled path)
                    model.generate(**inputs, max_new_tokens=args.new_tokens, **OFFICIAL_LIKE_DECODING, **decoding)
                for _ in range(args.repeats):
                    official = worker.generate()
                    official_seconds.append(official["seconds"])
                    for name, decoding in paths.items():
                        start = time.perf_counter()
                        ours = model.generate(
                            **inputs, max_new_tokens=args.new_tokens, **OFFICIAL_LIKE_DECODING, **decoding
                        )
                        ours_seconds[name].append(time.perf_counter() - start)
                        checks[name] = agreement(ours, official)
        finally:
            worker.close()
    official_median = statistics.median(official_seconds)
    for name in paths:
        ours_median = statistics.median(ours_seconds[name])
        print(
            f"(i) official generate / ours, {name} path (b1 S2S greedy, {args.new_tokens} new tokens, median of "
            f"{args.repeats} alternated): {official_median * 1e3:.0f} ms / {ours_median * 1e3:.0f} ms = "
            f"{official_median / ours_median:.2f}x; {checks[name]}"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-compiled", action="store_true", help="measure the default path only")
    parser.add_argument("--skip-eager-attention", action="store_true", help="compiled path with SDPA only")
    parser.add_argument("--skip-warm-start", action="store_true", help="skip (h), the cold vs warm first call")
    parser.add_argument(
        "--official-code", metavar="DIR", help="folder that contains the official funaudiochat package: adds (i)"
    )
    parser.add_argument(
        "--official-python",
        metavar="PY",
        default=sys.executable,
        help="a python with the official code's requirements, for (i) (default: this one)",
    )
    parser.add_argument("--only-official", action="store_true", help="run (i) only, skip (a)-(h)")
    args = parser.parse_args()
    if args.official_code is not None and (problem := official_code_error(args.official_code)) is not None:
        parser.error(problem)
    if args.only_official and args.official_code is None:
        parser.error("--only-official needs --official-code DIR")
    if not os.access(args.official_python, os.X_OK):
        parser.error(f"--official-python {args.official_python}: not an executable file")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = FunAudioChatForConditionalGeneration(bench_model_config()).eval()
    if args.only_official:
        print(f"threads={args.threads} new_tokens={args.new_tokens} repeats={args.repeats}")
        compare_with_official(model, args)
        return

    run(model, 1, 5, True)  # warm-up
    paths = {"default": measure(model, args.new_tokens, args.repeats)}
    compile_seconds = {}
    if not args.skip_compiled:
        # The same weights with eager attention (the default is SDPA), for the comparison (g).
        eager_model = copy.deepcopy(model)
        eager_model.set_attn_implementation("eager")
        compiled_models = [("compiled", model), ("compiled, eager attention", eager_model)]
        for name, compiled_model in compiled_models[: 1 if args.skip_eager_attention else 2]:
            # Compiled code is cached per function, not per model, and both models share `forward`: start each from
            # an empty cache so the second does not run into the first one's entries (torch's recompile limit).
            torch._dynamo.reset()
            start = time.perf_counter()
            # First calls: compile the LLM step and the SRH group for each shape measured. They generate as many
            # tokens as the measured calls, because the static caches' length is part of the compiled shapes.
            run(compiled_model, 1, args.new_tokens, True, None, compiled_decoding())
            run(compiled_model, 1, args.new_tokens, False, None, compiled_decoding())
            run(compiled_model, 8, args.new_tokens, True, None, compiled_decoding())
            compile_seconds[name] = time.perf_counter() - start
            paths[name] = measure(compiled_model, args.new_tokens, args.repeats, compiled_decoding())

    print(f"threads={args.threads} new_tokens={args.new_tokens} repeats={args.repeats}")
    for name, found in paths.items():
        print(f"[{name}]")
        print(
            f"(a) S2S decode step {found['s2s'] * 1e3:.2f} ms / matmul floor {found['s2s_floor'] * 1e3:.2f} ms = "
            f"{found['s2s'] / found['s2s_floor']:.2f}x"
        )
        print(
            f"(b) speech tokens/s batch 8 {found['b8']:.0f} / batch 1 {found['b1']:.0f} = "
            f"{found['b8'] / found['b1']:.2f}x; the weight matmuls alone allow 8 x floor(b1) / floor(b8) = "
            f"{8 * found['s2s_floor'] / found['b8_floor']:.2f}x"
        )
        print(f"(c) first speech group reaches the streamer {found['first_speech']} decode step(s) after the prefill")
        print(
            f"(d) S2T decode step {found['s2t'] * 1e3:.2f} ms / matmul floor {found['s2t_floor'] * 1e3:.2f} ms = "
            f"{found['s2t'] / found['s2t_floor']:.2f}x"
        )
    if compile_seconds:
        default, compiled = paths["default"], paths["compiled"]
        print(
            f"(e) compiled first calls (b1 S2S, b1 S2T, b8 S2S; {args.new_tokens} tokens each, compilation included) "
            + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in compile_seconds.items())
        )
        print(
            f"    default / compiled decode step: S2S {default['s2s'] / compiled['s2s']:.2f}x, "
            f"S2T {default['s2t'] / compiled['s2t']:.2f}x"
        )
        eager = paths.get("compiled, eager attention")
        if eager is not None:
            print(
                f"(g) compiled decode step, SDPA / eager attention: S2S {compiled['s2s'] / eager['s2s']:.2f}x, "
                f"S2T {compiled['s2t'] / eager['s2t']:.2f}x"
            )
    if not args.skip_compiled and not args.skip_warm_start:
        first_calls = first_compiled_call_seconds(args.threads, 10)
        if first_calls is not None:
            cold = first_calls["cold"]
            print(
                f"(h) first compiled call of a fresh process (b1 S2S, 10 tokens): cold {cold:.1f} s / warm with the "
                f"compile cache artifacts {first_calls['artifacts']:.1f} s = {cold / first_calls['artifacts']:.2f}x, "
                f"/ warm on the same machine (inductor cache directory kept) {first_calls['same machine']:.1f} s = "
                f"{cold / first_calls['same machine']:.2f}x"
            )
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        full, int8 = load_peak_megabytes(folder, "full"), load_peak_megabytes(folder, "int8")
    if full is not None and int8 is not None:
        print(
            f"(f) peak memory added by loading the bench model: full precision {full[0]:.0f} MB, int8 LLM "
            f"{int8[0]:.0f} MB = {int8[0] / full[0]:.2f}x; weights held after loading {full[1]:.0f} MB vs "
            f"{int8[1]:.0f} MB = {int8[1] / full[1]:.2f}x"
        )
    else:
        print("(f) peak memory: skipped (loading failed; is optimum-quanto installed?)")
    if args.official_code is not None:
        compare_with_official(model, args)


if __name__ == "__main__":
    main()
