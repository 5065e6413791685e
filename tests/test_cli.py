"""The ``fun-audio-chat`` console script: every command run in a subprocess on the tiny model, output checked.

The commands are independent, so a module fixture runs them all up front, two at a time (each process spends most
of its few seconds importing torch and transformers), and each test checks one command's result. The ``--help``
pages and the error cases run in one more subprocess that calls ``fun_audio_chat.cli.main`` once per argument list.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from fun_audio_chat.processing import example_audio_path

ASSET = Path(example_audio_path())
TIMEOUT = 240
pytestmark = pytest.mark.slow  # every test reads the output of CLI subprocesses


def _console_script() -> list[str]:
    script = Path(sys.executable).parent / "fun-audio-chat"
    if script.exists():
        return [str(script)]
    found = shutil.which("fun-audio-chat")
    return [found] if found else [sys.executable, "-m", "fun_audio_chat.cli"]


def _env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUN_AUDIO_CHAT_")}
    env.update(
        TQDM_DISABLE="1",
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp / "hf_home"),
        TRANSFORMERS_VERBOSITY="error",
        HF_DATASETS_CACHE=str(tmp / "datasets"),
        HF_DATASETS_DISABLE_PROGRESS_BARS="1",
    )
    return env


_ERROR_DRIVER = """
import contextlib, io, json, sys
from fun_audio_chat.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
    results.append({"argv": argv, "code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Inputs on disk: a tiny checkpoint, a base LLM, audio folders, a dataset, bad directories."""
    from transformers import Qwen3ForCausalLM

    from fun_audio_chat.tiny import tiny_model_and_processor

    tmp = tmp_path_factory.mktemp("cli")
    model, processor = tiny_model_and_processor(seed=3)
    model.save_pretrained(tmp / "tiny")
    processor.save_pretrained(tmp / "tiny")
    torch.manual_seed(1)
    Qwen3ForCausalLM(model.config.text_config).save_pretrained(tmp / "base")

    (tmp / "wavs" / "sub").mkdir(parents=True)
    shutil.copy(ASSET, tmp / "wavs" / "hello.wav")
    import soundfile as sf

    data, rate = sf.read(ASSET)
    sf.write(tmp / "wavs" / "sub" / "half.flac", data[: len(data) // 2], rate)  # another format, in a subfolder
    (tmp / "wavs" / "notes.txt").write_text("not audio, not picked up")

    import datasets

    datasets.Dataset.from_dict(
        {"audio": [str(ASSET), str(tmp / "wavs" / "sub" / "half.flac")], "utt": ["utt-1", "utt-2"]}
    ).cast_column("audio", datasets.Audio()).save_to_disk(str(tmp / "dataset"))

    (tmp / "empty").mkdir()
    (tmp / "not_fac").mkdir()
    (tmp / "not_fac" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp / "pickled").mkdir()
    shutil.copy(tmp / "tiny" / "config.json", tmp / "pickled" / "config.json")
    torch.save({"w": torch.zeros(1)}, tmp / "pickled" / "pytorch_model.bin")
    (tmp / "exists.jsonl").write_text("")
    # damaged checkpoints: garbage weights, a shard cut in half, a config that does not match the weights
    for name in ("corrupt", "truncated", "inconsistent"):
        shutil.copytree(tmp / "tiny", tmp / name)
    (tmp / "corrupt" / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    weights = (tmp / "truncated" / "model.safetensors").read_bytes()
    (tmp / "truncated" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    config = json.loads((tmp / "inconsistent" / "config.json").read_text())
    config["text_config"]["hidden_size"] *= 2
    (tmp / "inconsistent" / "config.json").write_text(json.dumps(config))
    (tmp / "bad_wavs").mkdir()
    shutil.copy(ASSET, tmp / "bad_wavs" / "a.wav")
    (tmp / "bad_wavs" / "b.wav").write_bytes(b"RIFF not really a wav")
    (tmp / "fake_vocoder.py").write_text(
        "import numpy as np\n"
        "class Vocoder:\n"
        "    sampling_rate = 24000\n"
        "    def __call__(self, codes):\n"
        "        return np.sin(np.arange(960 * len(codes)) / 10).astype(np.float32) * 0.1\n"
        "def build():\n"
        "    return Vocoder()\n"
    )
    return tmp


@pytest.fixture(scope="module")
def runs(work):
    """Run every command once (two processes at a time); returns {name: CompletedProcess}."""
    w = work
    commands = {
        "demo": ["demo", "--max-new-tokens", "12", "--out", str(w / "demo_out")],
        "chat_dir": [
            "chat",
            "--model",
            str(w / "tiny"),
            "--audio",
            str(ASSET),
            "--out",
            str(w / "chat_out"),
            "--max-new-tokens",
            "10",
            "--seed",
            "0",
            "--threads",
            "1",
        ],
        "chat_wav": [
            "chat",
            "--model",
            "tiny",
            "--audio",
            str(ASSET),
            "--out",
            str(w / "chat_wav_out"),
            "--max-new-tokens",
            "6",
            "--seed",
            "0",
            "--threads",
            "1",
            "--detokenizer",
            "fake_vocoder:build",
        ],
        "chat_text": [
            "chat",
            "--model",
            "tiny",
            "--audio",
            str(w / "wavs" / "sub" / "half.flac"),
            "--text-only",
            "--no-stream",
            "--greedy",
            "--out",
            str(w / "chat_text_out"),
            "--max-new-tokens",
            "8",
            "--threads",
            "1",
        ],
        "tokenize_folder": [
            "tokenize-speech",
            str(w / "wavs"),
            "--out",
            str(w / "codes.jsonl"),
            "--random-weights",
            "tiny",
            "--batch-size",
            "1",
            "--threads",
            "1",
        ],
        "tokenize_dataset": [
            "tokenize-speech",
            str(w / "dataset"),
            "--dataset",
            "--id-column",
            "utt",
            "--out",
            str(w / "dataset_codes.jsonl"),
            "--random-weights",
            "tiny",
            "--threads",
            "1",
        ],
        "merge": [
            "merge",
            "--tuned",
            str(w / "tiny"),
            "--base",
            str(w / "base"),
            "--alpha",
            "0.25",
            "--out",
            str(w / "merged"),
        ],
    }
    errors = [
        [],
        ["--help"],
        ["demo", "--help"],
        ["chat", "--help"],
        ["tokenize-speech", "--help"],
        ["merge", "--help"],
        ["chat", "--model", "tiny", "--audio", str(w / "missing.wav")],
        ["chat", "--model", str(w / "empty"), "--audio", str(ASSET)],
        ["chat", "--model", str(w / "not_fac"), "--audio", str(ASSET)],
        ["chat", "--model", str(w / "nowhere" / "model"), "--audio", str(ASSET)],
        ["chat", "--model", "someone/not-cached", "--audio", str(ASSET)],
        ["chat", "--model", "tiny", "--audio", str(w / "wavs" / "notes.txt")],
        ["chat", "--model", "tiny", "--audio", str(ASSET), "--detokenizer", "no_such_module:build"],
        ["tokenize-speech", str(w / "missing"), "--out", str(w / "x.jsonl"), "--random-weights", "tiny"],
        ["tokenize-speech", str(w / "empty"), "--out", str(w / "x.jsonl"), "--random-weights", "tiny"],
        ["tokenize-speech", str(w / "wavs"), "--out", str(w / "exists.jsonl"), "--random-weights", "tiny"],
        [
            "tokenize-speech",
            str(w / "dataset"),
            "--dataset",
            "--audio-column",
            "nope",
            "--out",
            str(w / "y.jsonl"),
            "--random-weights",
            "tiny",
        ],
        ["merge", "--tuned", str(w / "missing"), "--base", str(w / "base"), "--out", str(w / "m1")],
        ["merge", "--tuned", str(w / "pickled"), "--base", str(w / "base"), "--out", str(w / "m2")],
        ["merge", "--tuned", str(w / "tiny"), "--base", str(w / "base"), "--out", str(w / "empty")],
        ["merge", "--tuned", str(w / "tiny"), "--base", str(w / "base"), "--out", str(w / "m3"), "--alpha", "2"],
        ["chat", "--model", "tiny", "--audio", str(ASSET), "--max-new-tokens", "0"],
        ["demo", "--threads", "-1"],
        ["serve", "--threads", "0"],
        ["tokenize-speech", str(w / "wavs"), "--out", str(w / "z.jsonl"), "--batch-size", "0"],
        ["chat", "--model", "tiny", "--audio", str(ASSET), "--detokenizer", "json:loads"],
        ["chat", "--model", str(w / "corrupt"), "--audio", str(ASSET)],
        ["chat", "--model", str(w / "truncated"), "--audio", str(ASSET)],
        ["chat", "--model", str(w / "inconsistent"), "--audio", str(ASSET)],
        ["merge", "--tuned", str(w / "truncated"), "--base", str(w / "base"), "--out", str(w / "m4")],
        ["merge", "--tuned", str(w / "tiny"), "--base", str(w / "base"), "--out", str(w / "base"), "--overwrite"],
        ["merge", "--tuned", str(w / "tiny"), "--base", str(w / "base"), "--out", str(w), "--overwrite"],
        ["merge", "--tuned", str(w / "tiny"), "--base", "nowhere/base", "--out", str(w / "m5")],
        [
            "tokenize-speech",
            str(w / "bad_wavs"),
            "--out",
            str(w / "bad_codes.jsonl"),
            "--random-weights",
            "tiny",
            "--batch-size",
            "1",
        ],
    ]
    env = _env(w)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(w), env.get("PYTHONPATH")]))  # fake_vocoder

    def run(argv, prefix=None):
        cmd = (prefix or _console_script()) + argv
        return subprocess.run(cmd, cwd=w, env=env, capture_output=True, text=True, timeout=TIMEOUT)

    jobs = dict(commands)
    jobs["errors"] = None
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {
            name: pool.submit(run, argv)
            if argv is not None
            else pool.submit(run, ["-c", _ERROR_DRIVER, json.dumps(errors)], [sys.executable])
            for name, argv in jobs.items()
        }
        results = {name: future.result() for name, future in futures.items()}
    return results


def _ok(proc):
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    )
    return proc


# ------------------------------------------------------------------------------------------------ commands
def test_demo_streams_text_and_speech_with_timings(runs, work):
    out = _ok(runs["demo"]).stdout
    lines = out.splitlines()
    text_lines = [line for line in lines if line.startswith("  text ")]
    speech_lines = [line for line in lines if line.startswith("  speech ")]
    assert len(text_lines) == 12  # one text event per LLM step
    # "speech" + the group's real codes (at most 5; delay, pad and end ids are not codes and are not printed)
    assert speech_lines and all(2 <= len(line.split()) <= 6 for line in speech_lines)
    assert "audio " in out and "first audio chunk" in out  # the reply's audio streamed too
    assert text_lines[0].split()[-1] == "<|audio_bos|>"  # the reply opens speaking
    # streamed: speech groups arrive between the text steps, not all at the end
    positions = {
        kind: [i for i, line in enumerate(lines) if line.startswith(f"  {kind} ")] for kind in ("text", "speech")
    }
    assert positions["speech"][0] < positions["text"][2]
    for label in ("Timings", "first text token", "first speech group", "generation", "steps/s"):
        assert label in out, label
    assert "hello.wav" in out and "Paris" in out
    saved = json.loads((work / "demo_out" / "speech_codes.json").read_text())
    assert saved["num_codes"] == len(saved["codes"]) > 0 and saved["frame_rate_hz"] == 25
    assert all(0 <= c < 296 for c in saved["codes"])
    streamed = [int(c) for line in speech_lines for c in line.split()[1:]]
    assert streamed == saved["codes"]  # the streamed groups are exactly the reply's codes
    import soundfile as sf

    assert sf.info(work / "demo_out" / "reply.wav").frames == 960 * len(saved["codes"])


def test_chat_with_a_model_directory_writes_text_and_speech_codes(runs, work):
    proc = _ok(runs["chat_dir"])
    out_dir = work / "chat_out"
    reply = (out_dir / "reply.txt").read_text()
    codes = json.loads((out_dir / "speech_codes.json").read_text())
    from fun_audio_chat.cli import _printable

    assert _printable(reply.rstrip("\n"))[:10] in proc.stdout  # the reply was streamed to stdout
    assert codes["text"] == reply.rstrip("\n")
    assert codes["model"] == str(work / "tiny") and codes["audio"] == str(ASSET)
    assert codes["num_codes"] == len(codes["codes"]) > 0 and all(0 <= c < 296 for c in codes["codes"])
    assert not (out_dir / "reply.wav").exists()
    assert "no detokenizer" in proc.stderr and "speech codes" in proc.stderr


def test_chat_writes_a_wav_when_a_detokenizer_is_available(runs, work):
    import soundfile as sf

    proc = _ok(runs["chat_wav"])
    codes = json.loads((work / "chat_wav_out" / "speech_codes.json").read_text())["codes"]
    info = sf.info(work / "chat_wav_out" / "reply.wav")
    assert info.samplerate == 24000 and info.frames == 960 * len(codes) > 0
    assert "reply.wav" in proc.stderr and "no detokenizer" not in proc.stderr


def test_chat_text_only_with_the_builtin_model(runs, work):
    proc = _ok(runs["chat_text"])
    out_dir = work / "chat_text_out"
    assert (out_dir / "reply.txt").is_file()
    assert not (out_dir / "speech_codes.json").exists()
    assert "text only" in proc.stderr and "speech codes" not in proc.stderr


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tokenize_speech_over_a_folder(runs, work):
    proc = _ok(runs["tokenize_folder"])
    records = _jsonl(work / "codes.jsonl")
    assert [r["id"] for r in records] == ["hello.wav", "sub/half.flac"]  # sorted, recursive, audio only
    for record in records:
        assert record["num_codes"] == len(record["codes"]) > 0
        assert all(0 <= c < 6561 for c in record["codes"])
        assert abs(record["num_codes"] - 25 * record["duration_s"]) <= 2  # 25 Hz
    assert records[1]["duration_s"] == pytest.approx(records[0]["duration_s"] / 2, abs=1e-3)
    assert "tokenized 2 clip(s)" in proc.stdout
    assert "random weights" in proc.stderr  # warned loudly
    assert not (work / "codes.jsonl.partial").exists()


def test_tokenize_speech_over_a_dataset(runs, work):
    _ok(runs["tokenize_dataset"])
    _ok(runs["tokenize_folder"])  # both runs are part of the module's fixture: the comparison below always runs
    records = _jsonl(work / "dataset_codes.jsonl")
    assert [r["id"] for r in records] == ["utt-1", "utt-2"]
    folder = {r["id"]: r["codes"] for r in _jsonl(work / "codes.jsonl")}
    # same audio, same (seeded random) tokenizer: same codes
    assert records[0]["codes"] == folder["hello.wav"] and records[1]["codes"] == folder["sub/half.flac"]


def test_merge_checkpoints_on_disk(runs, work):
    from safetensors.torch import load_file

    proc = _ok(runs["merge"])
    merged_dir = work / "merged"
    for name in (
        "model.safetensors",
        "config.json",
        "merge_manifest.json",
        "README.md",
        "processor_config.json",
        "speech_tokenizer/tokenizer.json",
    ):
        assert (merged_dir / name).is_file(), name
    manifest = json.loads((merged_dir / "merge_manifest.json").read_text())
    assert manifest["alpha"] == 0.25
    tuned, base = load_file(work / "tiny" / "model.safetensors"), load_file(work / "base" / "model.safetensors")
    merged = load_file(merged_dir / "model.safetensors")
    key = "language_model.model.layers.1.self_attn.k_proj.weight"
    torch.testing.assert_close(merged[key], 0.25 * tuned[key] + 0.75 * base["model.layers.1.self_attn.k_proj.weight"])
    srh = "audio_invert_tower.input_matching.weight"
    assert torch.equal(merged[srh], tuned[srh])
    assert "Core-Cocktail merge" in (merged_dir / "README.md").read_text()
    assert "merged 25 tensors as 0.25 * tuned + 0.75 * base" in proc.stdout


# ------------------------------------------------------------------------------------------------ help and errors
@pytest.fixture(scope="module")
def driver(runs):
    results = json.loads(_ok(runs["errors"]).stdout.strip().splitlines()[-1])
    return {" ".join(r["argv"]): r for r in results}


def _find(driver, *parts):
    matches = [r for key, r in driver.items() if all(p in key for p in parts)]
    assert len(matches) == 1, (parts, list(driver))
    return matches[0]


def test_help_pages(driver):
    top = driver["--help"]
    assert top["code"] == 0
    for command in ("demo", "chat", "tokenize-speech", "merge"):
        assert command in top["stdout"]
    assert driver[""]["code"] == 2 and "usage" in driver[""]["stdout"]
    for command, options in {
        "demo": ["--max-new-tokens", "--audio", "--seed"],
        "chat": ["--model", "--audio", "--text-only", "--out", "--cosyvoice-dir"],
        "tokenize-speech": ["--out", "--tokenizer", "--dataset", "--batch-size", "--audio-column"],
        "merge": ["--tuned", "--base", "--alpha", "--out", "--on-shape-mismatch"],
    }.items():
        page = driver[f"{command} --help"]
        assert page["code"] == 0 and f"usage: fun-audio-chat {command}" in page["stdout"]
        for option in options:
            assert option in page["stdout"], (command, option)


@pytest.mark.parametrize(
    "parts, message",
    [
        (("chat", "missing.wav"), "audio file not found"),
        (("chat", "/empty "), "not a model directory (no config.json"),
        (("chat", "not_fac"), "not a Fun-Audio-Chat checkpoint"),
        (("chat", "nowhere/model"), "model directory not found"),
        (("chat", "someone/not-cached"), "could not load the Hub repo"),
        (("chat", "notes.txt"), "could not decode"),
        (("chat", "no_such_module"), "No module named 'no_such_module'"),
        (("tokenize-speech", "missing"), "no such file or folder"),
        (("tokenize-speech", "/empty "), "no audio found"),
        (("tokenize-speech", "exists.jsonl"), "pass --overwrite"),
        (("tokenize-speech", "nope"), "--audio-column nope: not a column"),
        (("merge", "missing"), "checkpoint not found"),
        (("merge", "pickled"), "pickle"),
        (("merge", "/empty"), "exists; pass --overwrite"),
        (("merge", "--alpha 2"), "must be between 0 and 1"),
        (("chat", "--max-new-tokens 0"), "argument --max-new-tokens: must be at least 1, got 0"),
        (("demo", "--threads -1"), "argument --threads: must be at least 1, got -1"),
        (("serve", "--threads 0"), "argument --threads: must be at least 1, got 0"),
        (("tokenize-speech", "--batch-size 0"), "argument --batch-size: must be at least 1, got 0"),
        (("chat", "json:loads"), "--detokenizer json:loads: loads() failed: TypeError"),
        (("chat", "/corrupt "), "is corrupt or inconsistent"),
        (("chat", "/truncated "), "is corrupt or inconsistent"),
        (("chat", "/inconsistent "), "is corrupt or inconsistent"),
        (("merge", "/truncated "), "truncated checkpoint"),
        (("merge", "/base --overwrite"), "is the base checkpoint"),
        (("merge", "nowhere/base"), "add --base-from-hub"),
        (("tokenize-speech", "bad_wavs"), "could not decode"),
    ],
)
def test_errors_are_one_clear_line_with_exit_status_2(driver, parts, message):
    result = _find(driver, *parts)
    assert result["code"] == 2, result
    stderr = result["stderr"].strip()
    assert message in stderr, stderr
    assert "Traceback" not in stderr
    command = result["argv"][0]
    assert stderr.splitlines()[-1].startswith(f"fun-audio-chat {command}: error: ")


def test_merge_into_a_folder_holding_its_inputs_is_refused_and_deletes_nothing(driver, work):
    (result,) = [
        r for r in driver.values() if r["argv"][:1] == ["merge"] and r["argv"][-2:] == [str(work), "--overwrite"]
    ]
    assert result["code"] == 2 and "contains the tuned checkpoint" in result["stderr"], result
    assert (work / "tiny" / "config.json").is_file() and (work / "base" / "config.json").is_file()


def test_failed_tokenize_speech_leaves_no_partial_file(driver, work):
    assert _find(driver, "tokenize-speech", "bad_wavs")["code"] == 2
    assert not (work / "bad_codes.jsonl").exists()
    assert [p.name for p in work.iterdir() if "partial" in p.name] == []
