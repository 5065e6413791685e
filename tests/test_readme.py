"""The README: its first lines are the two set-up commands, and every ```python block runs.

The blocks are executed in order, in one namespace, in a subprocess on the tiny built-in model (``FUN_AUDIO_CHAT_MODEL``
unset) with the working directory in a temporary folder. The Hub block pushes to ``tests/hub_server.py`` (a
Hub-compatible server on 127.0.0.1): the subprocess gets ``HF_ENDPOINT`` and a dummy token before
``huggingface_hub`` is imported.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> list[str]:
    return [match.group(1) for match in _BLOCK.finditer(text)]


def test_readme_starts_with_the_two_commands():
    lines = README.read_text(encoding="utf-8").splitlines()
    first = [line for line in lines if line.strip()][:5]
    assert first[0].startswith("# ")
    assert first[1] == "```bash"
    assert first[2].startswith("make demo") and first[3].startswith("make test")
    assert first[4] == "```"


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path):
    sys.path.insert(0, str(HERE))
    from hub_server import LocalHubServer

    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 6
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUN_AUDIO_CHAT_")}
    env.update(TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1")
    with LocalHubServer(lifetime=240) as server:
        env.update(server.client_env(tmp_path / "hf_home"))
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--run", str(README)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=220,
        )
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    assert proc.stdout.count("[readme block ok]") == len(blocks)


def _run_blocks(readme: Path) -> int:
    import torch

    torch.set_num_threads(1)
    namespace: dict = {"__name__": "__readme__"}
    for index, block in enumerate(python_blocks(readme.read_text(encoding="utf-8")), start=1):
        try:
            exec(compile(block, f"README.md python block {index}", "exec"), namespace)
        except Exception:
            print(f"[readme block {index} failed]\n{block}", flush=True)
            traceback.print_exc()
            return 1
        print(f"\n[readme block ok] {index}", flush=True)
    return 0


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--run":
    sys.exit(_run_blocks(Path(sys.argv[2])))
