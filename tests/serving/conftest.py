"""Fixtures for the serving tests: the tiny model, and real HTTP servers on 127.0.0.1 started in this process."""

from __future__ import annotations

import base64
import contextlib
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="serving tests need the serve extra: pip install 'fun-audio-chat[serve,test]'")

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "serving"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_detokenizer_or_none():
    """The tiny random detokenizer when the library has it (speech out), else None (text-only server)."""
    try:
        from fun_audio_chat.tiny import tiny_detokenizer
    except ImportError:
        return None
    return tiny_detokenizer(seed=0)


class LocalServer:
    """``create_app(engine)`` served by uvicorn in a thread of this process, on 127.0.0.1."""

    def __init__(self, engine, model_id: str = "tiny", **app_kwargs):
        import uvicorn

        from fun_audio_chat.serving import create_app

        self.engine = engine
        self.app = create_app(engine, model_id, **app_kwargs)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="test-uvicorn")

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def client(self, **kwargs):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="not-needed", max_retries=0, timeout=120, **kwargs)


@pytest.fixture(scope="session")
def tiny_pair():
    from fun_audio_chat.tiny import tiny_model_and_processor

    return tiny_model_and_processor(0)


@pytest.fixture(scope="session")
def hello_b64() -> str:
    from fun_audio_chat.processing import example_audio_path

    return base64.b64encode(Path(example_audio_path()).read_bytes()).decode("ascii")


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


class ScriptedReply:
    """Logits processor making the random tiny model answer with a fixed token script (e.g. a tool call), to test the
    API around it. One reply at a time: a sequence no longer than the last prompt starts a new reply."""

    def __init__(self, script: list[int]):
        self.script = script
        self.prompt_length = None

    def __call__(self, input_ids, scores):
        if self.prompt_length is None or input_ids.shape[1] <= self.prompt_length:
            self.prompt_length = input_ids.shape[1]
        step = min(input_ids.shape[1] - self.prompt_length, len(self.script) - 1)
        forced = scores.new_full(scores.shape, float("-inf"))
        forced[:, self.script[step]] = 0.0
        return forced


def speech_like(seconds: float, pitch: float, rate: int = 16000):
    """A voiced, speech-shaped clip (harmonics of ``pitch`` with a 4 Hz syllable envelope) to clone voices from."""
    import numpy as np

    t = np.arange(int(seconds * rate)) / rate
    wave = sum(np.sin(2 * np.pi * pitch * k * t) / k for k in range(1, 8)) * (0.55 + 0.45 * np.sin(2 * np.pi * 4 * t))
    return (0.2 * wave).astype(np.float32)


@contextlib.contextmanager
def serve_subprocess(extra_args: list[str], log, timeout: float = 180):
    """``fun-audio-chat serve`` (tiny model) on a free port, its output in ``log``; yields (url, /health answer) once
    it answers, and stops it after."""
    import json
    import os
    import subprocess
    import sys
    import urllib.request

    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    command = [sys.executable, "-m", "fun_audio_chat.cli", "serve", "--port", str(port), *extra_args]
    process = subprocess.Popen(command + ["--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    health = None
    try:
        while health is None:
            if process.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"fun-audio-chat serve {' '.join(extra_args)} did not start:\n{log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    health = json.loads(response.read())
            except OSError:
                time.sleep(0.3)
        yield url, health
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
