"""Every notebook in ``notebooks/`` runs top to bottom on the tiny built-in model (nbclient, a kernel of this venv).

The kernel gets this process's environment without ``FUN_AUDIO_CHAT_MODEL`` (so the notebooks pick the tiny model),
offline Hub settings, no progress bars, and a temporary output directory; any cell error fails the test with the
cell's traceback. The notebooks are kept without outputs in git.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import nbclient  # the "notebooks" extra: missing packages fail the suite rather than skip it
import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = {"quickstart", "lora_finetuning", "core_cocktail", "dpo", "push_to_hub", "function_calling", "voices"}
CELL_TIMEOUT = 180  # seconds per cell; the whole notebook should take well under a minute
NOTEBOOK_BUDGET = 90  # seconds for a whole notebook on the tiny model (a loaded CI machine included)


def _kernel_name() -> str:
    """The ipykernel kernelspec of this interpreter ("python3" resolves to sys.executable in jupyter_client)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:  # pragma: no cover - ipykernel always provides its native kernel
        pytest.fail("no python3 kernelspec (install ipykernel, part of the notebooks extra)")
    if spec.argv[0] not in ("python", "python3", sys.executable):
        pytest.fail(f"the python3 kernelspec runs {spec.argv[0]}, not this interpreter ({sys.executable})")
    return "python3"


def test_every_notebook_is_present_and_clean():
    assert {p.stem for p in NOTEBOOKS} == EXPECTED
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code, path.name
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), (
            f"{path.name} is committed with outputs; clear them"
        )
        # each notebook reads the model id from the environment (tiny model when unset)
        assert any('os.environ.get("FUN_AUDIO_CHAT_MODEL")' in c.source for c in code), path.name


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUN_AUDIO_CHAT_")}
    env.update(
        TQDM_DISABLE="1",
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_DATASETS_DISABLE_PROGRESS_BARS="1",
        HF_HOME=str(tmp_path / "hf_home"),
        HF_DATASETS_CACHE=str(tmp_path / "datasets"),
        TRANSFORMERS_VERBOSITY="error",
        TOKENIZERS_PARALLELISM="false",
        FUN_AUDIO_CHAT_OUTPUT_DIR=str(tmp_path / "outputs"),
        PYDEVD_DISABLE_FILE_VALIDATION="1",
    )
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        kernel_name=_kernel_name(),
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
        allow_errors=False,
    )
    start = time.perf_counter()
    try:
        client.execute(env=env, cwd=str(NOTEBOOK_DIR))
    except nbclient.exceptions.CellExecutionError as err:
        message = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # IPython colours its tracebacks
        pytest.fail(f"{path.name} failed:\n{message}", pytrace=False)
    elapsed = time.perf_counter() - start
    assert elapsed < NOTEBOOK_BUDGET, f"{path.name} took {elapsed:.0f} s on the tiny model"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
