"""bench_generate.py's section (i), official generate vs ours, without the official code (CI does not have it): bad
``--official-code`` folders give one-line errors, and an official class that does not load our saved layout cleanly
makes the worker, and through it the benchmark, fail loudly instead of timing a half-loaded model."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
WORKER = BENCHMARKS / "official_generate_worker.py"

# Stands in for the official package: its class reports a key our saved checkpoint lacks and an extra one it has.
LOADS_WITH_KEY_PROBLEMS = """
class FunAudioChatForConditionalGeneration:
    @classmethod
    def from_pretrained(cls, folder, **kwargs):
        assert kwargs.get("output_loading_info"), "the worker must ask for the loading info"
        info = {"missing_keys": ["audio_tower.embed_tokens.weight"], "unexpected_keys": ["extra.weight"],
                "mismatched_keys": [], "error_msgs": []}
        return cls(), info
"""


def run(script: Path, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), *arguments], cwd=BENCHMARKS, capture_output=True, text=True, timeout=120
    )


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode != 0, done.stdout[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1, done.stderr[-3000:]
    return errors[0]


@pytest.fixture
def fake_official_code(tmp_path):
    package = tmp_path / "official" / "funaudiochat"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "modeling_funaudiochat.py").write_text(LOADS_WITH_KEY_PROBLEMS)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    inputs = tmp_path / "inputs.safetensors"
    inputs.write_bytes(b"")
    return {"code": package.parent, "model": model, "inputs": inputs}


def worker_arguments(code, model, inputs) -> list[str]:
    return ["--official-code", str(code), "--model", str(model), "--inputs", str(inputs)]


def test_worker_names_a_missing_official_code_folder(tmp_path, fake_official_code):
    missing = tmp_path / "nowhere"
    done = run(WORKER, *worker_arguments(missing, fake_official_code["model"], fake_official_code["inputs"]))
    assert done.returncode == 2
    assert f"--official-code {missing}: no such folder" in one_error_line(done)


def test_worker_names_a_folder_without_the_official_package(tmp_path, fake_official_code):
    done = run(WORKER, *worker_arguments(tmp_path, fake_official_code["model"], fake_official_code["inputs"]))
    assert done.returncode == 2
    assert "modeling_funaudiochat.py" in one_error_line(done)


def test_worker_fails_loudly_when_the_official_class_does_not_load_every_key(fake_official_code):
    done = run(WORKER, *worker_arguments(**fake_official_code))
    assert done.returncode == 2
    error = one_error_line(done)
    assert "does not load the saved bench model cleanly" in error
    assert "missing keys ['audio_tower.embed_tokens.weight']" in error
    assert "unexpected keys ['extra.weight']" in error
    assert '"ready"' not in done.stdout, "a half-loaded model must never be timed"


def test_bench_rejects_a_bad_official_code_folder_before_building_the_model(tmp_path):
    done = run(BENCHMARKS / "bench_generate.py", "--only-official", "--official-code", str(tmp_path))
    assert done.returncode == 2
    assert "modeling_funaudiochat.py" in one_error_line(done)


def test_bench_stops_with_the_workers_loading_error(fake_official_code):
    # Our side really saves the bench model; the stand-in official class then reports the key problems.
    done = run(
        BENCHMARKS / "bench_generate.py",
        "--only-official",
        "--repeats",
        "1",
        "--new-tokens",
        "2",
        "--official-code",
        str(fake_official_code["code"]),
    )
    assert done.returncode != 0
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("bench_generate.py: error: the official generate worker failed:"), done.stderr[-3000:]
    assert "missing keys ['audio_tower.embed_tokens.weight']" in error
