"""The package as users get it: sdist and wheel build, pass `twine check`, and the wheel alone (not the editable
checkout) installs into a fresh virtualenv with its declared core dependencies and runs `fun-audio-chat demo`.

This catches package data left out of the wheel (assets, templates, static files) and imports of packages that only
the development install has.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH_PIN = "torch==2.13.0"  # the CPU build this machine kind provides; installed first so pip picks no CUDA build


def _run(cmd, cwd=None, env=None, timeout=900):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(map(str, cmd))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(out), str(ROOT)])
    return out


@pytest.mark.slow
def test_sdist_and_wheel_build_and_pass_twine_check(dist):
    wheels, sdists = list(dist.glob("*.whl")), list(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1
    _run([sys.executable, "-m", "twine", "check", "--strict", *map(str, wheels + sdists)])
    import zipfile

    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "fun_audio_chat/assets/hello.wav" in names
    assert not any(name.startswith("tests/") for name in names)


@pytest.mark.slow
def test_the_wheel_alone_runs_the_demo_in_a_fresh_venv(dist, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    wheel = next(dist.glob("*.whl"))
    _run([str(python), "-m", "pip", "install", "-q", "--no-compile", TORCH_PIN])
    _run([str(python), "-m", "pip", "install", "-q", "--no-compile", str(wheel), TORCH_PIN])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FUN_AUDIO_CHAT_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(HF_HUB_OFFLINE="1", TQDM_DISABLE="1", HF_HOME=str(tmp_path / "hf_home"))
    # run from an empty directory so nothing of the checkout can be imported by accident
    where = _run([str(python), "-c", "import fun_audio_chat; print(fun_audio_chat.__file__)"], cwd=tmp_path, env=env)
    assert str(env_dir) in where.stdout, where.stdout
    demo = _run([str(env_dir / "bin" / "fun-audio-chat"), "demo"], cwd=tmp_path, env=env, timeout=600)
    assert "speech" in demo.stdout.lower(), demo.stdout[-2000:]
