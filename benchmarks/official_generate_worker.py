"""Subprocess worker of bench_generate.py's section (i): times the official Fun-Audio-Chat generate().

It runs under a Python that has the official code's requirements (transformers 4.52.3, numpy<2), imports the official
``funaudiochat`` package from the folder given by ``--official-code`` at run time and holds none of its code. It loads
the saved bench model once, fails if the official class reports missing or unexpected keys (our saved layout is meant
to equal the official one), prints one JSON line ``{"ready": ...}``, then answers every ``generate`` line on stdin
with one JSON line: the seconds of that call, the sequences and the speech codes. End of input ends the worker.

The decoding matches bench_generate's comparison call: greedy text with the audio-BOS forced at the first step
(``force_text_abos``), greedy Speech Refined Head codes, no logits processors, stop at the text EOS.

Usage: python official_generate_worker.py --official-code DIR --model DIR --inputs FILE [--new-tokens 100]
    [--threads 2] [--eos-token-id ID] [--pad-token-id ID]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

OFFICIAL_MODELING = Path("funaudiochat") / "modeling_funaudiochat.py"


def official_code_error(folder: str | Path) -> str | None:
    """Why ``folder`` cannot be used as ``--official-code`` (one line), or None when it holds the official package."""
    folder = Path(folder)
    if not folder.is_dir():
        return f"--official-code {folder}: no such folder"
    if not (folder / OFFICIAL_MODELING).is_file():
        return (
            f"--official-code {folder}: no {OFFICIAL_MODELING} in it; pass the folder that contains the official "
            "funaudiochat package (github FunAudioLLM/Fun-Audio-Chat)"
        )
    return None


def loading_error(loading_info: dict) -> str | None:
    """One line naming the keys the official class did not match in our saved checkpoint, or None when all match."""
    problems = [
        f"{kind.replace('_', ' ')} {sorted(keys)}"
        for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
        if (keys := loading_info.get(kind))
    ]
    if not problems:
        return None
    return "the official class does not load the saved bench model cleanly: " + "; ".join(problems)


def fail(message: str) -> None:
    print(f"official_generate_worker.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-code", required=True, help="folder that contains the official funaudiochat")
    parser.add_argument("--model", required=True, help="folder of the saved bench model (save_pretrained)")
    parser.add_argument("--inputs", required=True, help="safetensors file of the prompt's input tensors")
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eos-token-id", type=int, default=None)
    parser.add_argument("--pad-token-id", type=int, default=None)
    args = parser.parse_args()
    if (problem := official_code_error(args.official_code)) is not None:
        fail(problem)
    if not Path(args.model, "config.json").is_file():
        fail(f"--model {args.model}: no config.json in it")
    if not Path(args.inputs).is_file():
        fail(f"--inputs {args.inputs}: no such file")

    import torch
    from safetensors.torch import load_file

    sys.path.insert(0, str(Path(args.official_code).resolve()))
    from funaudiochat.modeling_funaudiochat import FunAudioChatForConditionalGeneration

    torch.set_num_threads(args.threads)
    # SDPA: the official audio encoder's eager attention scrambles heads and time (see the oracle's quirk Q1).
    model, loading_info = FunAudioChatForConditionalGeneration.from_pretrained(
        args.model, attn_implementation="sdpa", output_loading_info=True
    )
    if (problem := loading_error(loading_info)) is not None:
        fail(problem)
    model.eval()
    model.sp_gen_kwargs.update(
        {"text_greedy": True, "only_crq_sampling": True, "disable_speech": False, "force_text_abos": True}
    )
    inputs = load_file(args.inputs)
    print(json.dumps({"ready": True, "loaded_tensors": len(model.state_dict())}), flush=True)

    for line in sys.stdin:
        if line.strip() != "generate":
            fail(f"unknown command {line.strip()!r} on stdin; the only command is 'generate'")
        with torch.no_grad():
            start = time.perf_counter()
            sequences, speech_ids = model.generate(
                **inputs,
                max_new_tokens=args.new_tokens,
                do_sample=False,
                eos_token_id=args.eos_token_id,
                pad_token_id=args.pad_token_id,
            )
            seconds = time.perf_counter() - start
        print(
            json.dumps({"seconds": seconds, "sequences": sequences.tolist(), "speech_ids": speech_ids.tolist()}),
            flush=True,
        )


if __name__ == "__main__":
    main()
