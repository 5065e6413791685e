"""The voice part of ``benchmarks/bench_token2wav.py`` runs on the tiny detokenizer (the real-size run is the
benchmark's own; this catches the report breaking)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_token2wav.py"


def test_voice_report_prints_the_ratios(tiny, capsys):
    spec = importlib.util.spec_from_file_location("bench_token2wav", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    codes = torch.randint(0, tiny.config.flow.vocab_size, (30,), generator=torch.Generator().manual_seed(0))
    bench.voice_report(tiny, codes.tolist(), prompt_seconds=1.2)
    printed = capsys.readouterr().out
    for line in ("offline (one call)", "web-demo, windowed vocoder", "voice prompt cache", "cached chunked"):
        assert line in printed
