"""Publishing a merge output survives a kill at every step (docs/reliability.md#merges).

Each case forks a child process that publishes a new output over the given start state and SIGKILLs itself at the
N-th event of the publish sequence: before and after each ``os.rename`` / ``os.replace`` and at each
``_publish_step``. N counts up until the child finishes. After every kill, the next run's repair
(``remove_stale_partial_dirs``, which every merge and save into the folder calls first) must leave the old or the
new output, whole, at the declared path, and no temporary folder; once the journal was written, the new one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fun_audio_chat.trainers.merging import output as output_module
from fun_audio_chat.trainers.merging import read_manifest, recover_output_dir, remove_stale_partial_dirs

NEW_FILES = {"model.safetensors": "new weights", "config.json": '{"new": true}'}
OLD_FILES = {"model.safetensors": "old weights", "config.json": '{"old": true}', "extra.txt": "only in the old"}


def _contents(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


def _start_state(parent: Path, start: str) -> Path:
    target = parent / "out"
    if start == "existing":
        target.mkdir()
        for name, text in OLD_FILES.items():
            (target / name).write_text(text)
    elif start == "empty":
        target.mkdir()
    (parent / "unrelated.txt").write_text("not ours")
    return target


def _publish_and_die_at(target: Path, kill_at: int) -> tuple[int, list[str]]:
    """Fork a child that publishes ``NEW_FILES`` at ``target`` and kills itself at event ``kill_at`` (1-based);
    returns its exit status and the events it went through (the last one is where it died)."""
    events_file = target.parent / "events.json"
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery runs here, it only ends through os._exit or the kill
        try:
            events: list[str] = []

            def event(name: str) -> None:
                events.append(name)
                events_file.write_text(json.dumps(events))
                if len(events) == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)

            def watched(real, label):
                def call(src, dst, *args, **kwargs):
                    event(f"before {label} {Path(src).name} -> {Path(dst).name}")
                    real(src, dst, *args, **kwargs)
                    event(f"after {label} {Path(src).name} -> {Path(dst).name}")

                return call

            os.rename = watched(os.rename, "rename")
            os.replace = watched(os.replace, "replace")
            output_module._publish_step = event
            with output_module.atomic_output_dir(target, overwrite=True) as tmp:
                for name, text in NEW_FILES.items():
                    (tmp / name).write_text(text)
            os._exit(0)
        except BaseException:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    events = json.loads(events_file.read_text()) if events_file.exists() else []
    events_file.unlink(missing_ok=True)
    return status, events


@pytest.mark.parametrize("start", ["existing", "empty", "absent"])
def test_publish_is_recoverable_at_every_kill_point(tmp_path, start):
    kill_points = []
    for kill_at in range(1, 50):
        parent = tmp_path / f"kill-{kill_at}"
        parent.mkdir()
        target = _start_state(parent, start)
        old = _contents(target) if target.exists() else None
        status, events = _publish_and_die_at(target, kill_at)
        if os.WIFEXITED(status):
            assert os.WEXITSTATUS(status) == 0, events
            assert len(events) < kill_at
            assert _contents(target) == NEW_FILES
            assert sorted(p.name for p in parent.iterdir()) == ["out", "unrelated.txt"]
            break
        assert os.WTERMSIG(status) == signal.SIGKILL
        where = events[-1]
        kill_points.append(where)
        journal_written = "journal written" in events
        # the next run's repair, which every merge and save into this folder does first
        remove_stale_partial_dirs(parent)
        assert sorted(p.name for p in parent.iterdir()) == sorted(
            ["unrelated.txt"] + (["out"] if target.exists() else [])
        ), where
        if journal_written:
            assert _contents(target) == NEW_FILES, where
        elif old is not None:
            assert _contents(target) == old, where
        else:
            assert not target.exists(), where
        assert (parent / "unrelated.txt").read_text() == "not ours"
    else:
        pytest.fail("the publish never finished")
    renames = [point for point in kill_points if "rename" in point]
    # the sequence really was interrupted around each rename it makes (old aside, new into place)
    assert len(renames) == (4 if start == "existing" else 2), kill_points
    assert "journal written" in kill_points and "published" in kill_points


def test_recover_output_dir_leaves_a_live_writers_journal_alone(tmp_path):
    target = _start_state(tmp_path, "existing")
    new = tmp_path / ".out.partial-live"
    new.mkdir()
    output_module._write_partial_marker(new)
    journal = output_module._write_journal(target, new, tmp_path / ".out.old-live")  # this process: alive
    assert recover_output_dir(target) is False
    assert remove_stale_partial_dirs(tmp_path) == []
    assert new.is_dir() and journal.is_file() and _contents(target) == OLD_FILES


def test_a_journal_cut_short_is_dropped_and_the_old_output_kept(tmp_path):
    target = _start_state(tmp_path, "existing")
    (tmp_path / ".out.publish.json").write_text('{"pid": 1')  # killed while writing it: nothing was moved yet
    remove_stale_partial_dirs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "unrelated.txt"]
    assert _contents(target) == OLD_FILES


def test_a_journal_naming_folders_outside_its_output_is_refused(tmp_path):
    target = _start_state(tmp_path, "existing")
    victim = tmp_path / "victim"
    victim.mkdir()
    journal = tmp_path / ".out.publish.json"
    dead = {"pid": 2**22 + 7, "host": os.uname().nodename}
    journal.write_text(json.dumps({**dead, "target": "out", "new": "../victim", "old": "victim"}))
    assert recover_output_dir(target) is False
    assert victim.is_dir() and _contents(target) == OLD_FILES


def test_overwriting_merge_killed_between_the_renames_is_recovered_by_the_next_run(tmp_path):
    """The issue's case: the old output moved aside, the new one not yet in place. The next merge into the folder
    (or ``recover_output_dir``) puts the new output at the declared path; nothing else is left."""
    import torch

    from tests.trainers.test_merging import LOAD_MERGING, save_pair

    _, _, tuned_dir, base_dir = save_pair(tmp_path, torch.float32)
    out = tmp_path / "merged"
    script = LOAD_MERGING + textwrap.dedent(
        f"""
        import os, signal
        merge_weights({str(tuned_dir)!r}, {str(base_dir)!r}, 0.25, output_dir={str(out)!r}, show_progress=False)
        def die(step):
            if step == "old moved aside":
                os.kill(os.getpid(), signal.SIGKILL)
        sys.modules["merging.output"]._publish_step = die
        merge_weights({str(tuned_dir)!r}, {str(base_dir)!r}, 0.75, output_dir={str(out)!r}, show_progress=False,
                      overwrite=True)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not out.exists()  # the instant the issue describes
    assert recover_output_dir(out) is True
    assert read_manifest(out)["alpha"] == 0.75
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")] == []
