"""Every benchmark script runs to the end on small settings and prints its result lines. Their numbers are not
checked here (timing claims live in the scripts' own output); this catches a script broken by a library change."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

SMALL_RUNS = [
    ("bench_generate.py", ["--new-tokens", "6", "--repeats", "1", "--skip-compiled"], ["(a) S2S", "(d) S2T", "(f) "]),
    (
        "bench_fused_step.py",
        ["--steps", "5", "--repeats", "1", "--batch-sizes", "2", "--backend", "eager"],
        ["two regions / one region", "two regions / LLM + group region"],
    ),
    ("bench_drsr.py", ["--seconds", "2", "--batch", "1", "--repeats", "1"], ["ratio full / Qwen3"]),
    ("bench_dpo_streams.py", ["--pairs", "2", "--steps", "2"], ["speech share"]),
    ("bench_reliability.py", ["--repeats", "1"], ["ratio"]),
    (
        "bench_serve.py",
        ["--clients", "1", "2", "--rounds", "1", "--max-tokens", "4", "--realtime-clients", "1"],
        [
            "staggered arrivals",
            "simultaneous arrivals",
            "throughput x",
            "server-side p50",
            "Realtime API",
            "arrival-span bound",
            "one speech worker",
        ],
    ),
    (
        "bench_token2wav.py",
        ["--codes", "10", "--batch", "0", "--streams", "2", "--patterns", "official"],
        ["RTF", "push_streams"],
    ),
    ("bench_voice_cloning.py", ["--seconds", "3", "--repeats", "1"], ["S3 speech codes", "clone time"]),
    (
        "bench_compiled_serving.py",
        ["--backend", "eager", "--batch-sizes", "1", "2", "--steps", "4", "--repeats", "1"],
        ["compiled warm-up", "compiled / default", "batch 2 / batch 1 throughput"],
    ),
]


def test_every_benchmark_script_is_covered():
    assert {script for script, _, _ in SMALL_RUNS} == {
        path.name for path in BENCHMARKS.glob("bench_*.py") if path.name != "bench_configs.py"
    }


@pytest.mark.slow
@pytest.mark.parametrize("script, arguments, expected", SMALL_RUNS, ids=[run[0] for run in SMALL_RUNS])
def test_benchmark_script_runs(script, arguments, expected):
    done = subprocess.run(
        [sys.executable, script, *arguments], cwd=BENCHMARKS, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for text in expected:
        assert text in done.stdout, f"{script} did not print {text!r}:\n{done.stdout[-2000:]}"
