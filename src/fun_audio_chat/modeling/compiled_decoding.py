"""Compiled decoding set-up: the generate() settings that select it, warming it up, and torch's compile caches.

The first compiled call of a process traces and compiles the LLM decode step and the SRH group (tens of seconds on
CPU). Two things make that cheaper:

* :func:`warm_up_compiled_decoding` runs that first call at start-up (a server's), for the batch sizes and the
  longest reply it will serve: later calls with a shorter prompt or reply reuse the compiled graphs, since both
  static caches keep the largest size seen (transformers' for the LLM, ``speech_decoding`` for the SRH).
* torch's portable compile caches (``torch.compiler.save_cache_artifacts`` / ``load_cache_artifacts``: inductor's
  compiled kernels and AOTAutograd's graphs) saved to a file after a warm-up and loaded by the next process with
  the same torch version, model shapes and settings, which then skips code generation and C++ compilation; dynamo
  still traces the Python (a few seconds).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import CompileConfig
from transformers.generation import StoppingCriteria, StoppingCriteriaList

from ..framework_compat import compile_on_every_device


def compiled_decoding_settings(compile_config: CompileConfig | None = None) -> dict:
    """``generate()`` keyword arguments of compiled decoding: a static cache and a compile config, opted in off GPU
    too (transformers compiles decode steps on CPU only when ``_compile_all_devices`` is set)."""
    compile_config = compile_on_every_device(compile_config or CompileConfig())
    return {"cache_implementation": "static", "compile_config": compile_config}


def load_compile_cache(path: str | Path) -> bool:
    """Load torch compile cache artifacts saved by :func:`save_compile_cache`; False when the file does not exist or
    torch cannot read it (torch then warns and the next compile starts from scratch)."""
    path = Path(path)
    if not path.is_file():
        return False
    return torch.compiler.load_cache_artifacts(path.read_bytes()) is not None


def save_compile_cache(path: str | Path) -> bool:
    """Save the compile cache artifacts this process has produced so far; False when there is nothing to save."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return False
    artifacts, _ = saved
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".partial")
    temporary.write_bytes(artifacts)
    temporary.replace(path)  # a reader never sees half a file
    return True


class _StopAfterSteps(StoppingCriteria):
    """Stops every row after ``steps`` decode steps: enough to compile, without decoding the whole reply."""

    def __init__(self, prompt_length: int, steps: int):
        self.stop_at = prompt_length + steps

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = input_ids.shape[1] >= self.stop_at
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def warm_up_compiled_decoding(
    model,
    batch_sizes: tuple[int, ...] = (1,),
    prompt_length: int = 64,
    max_new_tokens: int = 256,
    speech: bool | None = None,
    compile_config: CompileConfig | None = None,
    cache_path: str | Path | None = None,
) -> dict[int, float]:
    """Compile the decode graphs for the shapes a server will serve; returns seconds per batch size.

    Each batch size runs one short greedy ``generate`` on a text prompt of ``prompt_length`` ids whose static caches
    are sized for ``prompt_length + max_new_tokens`` positions: pass the longest prompt plus reply you will serve,
    so every later call fits in them. ``speech`` (default: whether the model has the Speech Refined Head) also
    compiles the SRH group. With ``cache_path``, torch's compile caches are loaded from it first (when it exists)
    and saved to it afterwards, so the next process starts warm.
    """
    if prompt_length < 1 or max_new_tokens < 3:
        raise ValueError(
            f"warm-up needs prompt_length >= 1 and max_new_tokens >= 3, got {prompt_length} and {max_new_tokens}."
        )
    if not batch_sizes or any(int(size) < 1 for size in batch_sizes):
        raise ValueError(f"batch_sizes must list positive batch sizes, got {batch_sizes!r}.")
    if cache_path is not None:
        load_compile_cache(cache_path)
    if speech is None:
        speech = getattr(model, "audio_invert_tower", None) is not None
    text_config = model.config.text_config
    device = model.get_input_embeddings().weight.device
    generator = torch.Generator().manual_seed(0)
    settings = compiled_decoding_settings(compile_config)
    timings = {}
    for size in batch_sizes:
        prompt = torch.randint(0, min(text_config.vocab_size, 100), (int(size), prompt_length), generator=generator)
        if speech:
            prompt[:, -1] = text_config.audio_bos_index
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(
                input_ids=prompt.to(device),
                attention_mask=torch.ones_like(prompt).to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                speech_do_sample=False,
                return_speech=speech,
                pad_token_id=0,
                # three steps: the first decode step compiles, the next two check that it is reused
                stopping_criteria=StoppingCriteriaList([_StopAfterSteps(prompt_length, 3)]),
                **settings,
            )
        timings[int(size)] = time.perf_counter() - start
    if cache_path is not None:
        save_compile_cache(cache_path)
    return timings


__all__ = [
    "compiled_decoding_settings",
    "load_compile_cache",
    "save_compile_cache",
    "warm_up_compiled_decoding",
]
