"""Start-up of the command line and growth of the tool-call parsers, side by side.

1. ``fun-audio-chat --help`` and an argument error (``--max-new-tokens 0``) against ``python -c "import torch,
   transformers"`` (what every command cost before the package imports became lazy): the CLI answers without them.
2. ``parse_tool_calls`` and ``StreamingToolCallParser`` (4-character pieces) on hostile inputs of n and 8n characters:
   the time ratio is about 8 for a linear parser, 64 for a quadratic one.

Each start-up figure is the median of ``--repeats`` fresh processes. Usage:
python benchmarks/bench_reliability.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _median_seconds(cmd: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _best(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    script = Path(sys.executable).parent / "fun-audio-chat"
    cli = [str(script)] if script.exists() else [shutil.which("fun-audio-chat") or "fun-audio-chat"]
    heavy = _median_seconds([sys.executable, "-c", "import torch, transformers"], args.repeats)
    rows = [
        ("fun-audio-chat --help", _median_seconds([*cli, "--help"], args.repeats)),
        (
            "fun-audio-chat chat ... --max-new-tokens 0",
            _median_seconds(
                [*cli, "chat", "--model", "tiny", "--audio", "x.wav", "--max-new-tokens", "0"], args.repeats
            ),
        ),
    ]
    print(f"start-up (median of {args.repeats} processes)")
    print(f"  {'import torch, transformers':45s} {heavy:6.2f} s")
    for name, seconds in rows:
        print(f"  {name:45s} {seconds:6.2f} s   ({heavy / seconds:5.1f}x faster than the imports alone)")

    from fun_audio_chat.processing.tool_calling import StreamingToolCallParser, parse_tool_calls

    def stream(text: str):
        p = StreamingToolCallParser()
        for i in range(0, len(text), 4):
            p.feed(text[i : i + 4])
        return p.finish()

    cases = [
        ("parse_tool_calls('<tool_call>' * n)", lambda n: "<tool_call>" * n, parse_tool_calls, 2000),
        ("streaming, one open block, 4-char pieces", lambda n: "<tool_call>" + "a" * n, stream, 32000),
        ("streaming, '<tool_call>' * n, 4-char pieces", lambda n: "<tool_call>" * n, stream, 3000),
    ]
    print("\nparser growth: time at 8n / time at n (linear ~8, quadratic ~64)")
    for name, make, run, n in cases:
        small, large = make(n), make(8 * n)
        t_small, t_large = _best(lambda s=small, f=run: f(s)), _best(lambda s=large, f=run: f(s))
        print(
            f"  {name:45s} n={n:6d}: {t_small * 1e3:8.2f} ms  8n: {t_large * 1e3:8.2f} ms  ratio {t_large / t_small:5.1f}"
        )


if __name__ == "__main__":
    main()
