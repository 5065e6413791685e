"""Core-Cocktail: the merge callback, the two-stage runner's LR schedule, resumption, and a loss-lowering run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import TrainerCallback

import fun_audio_chat.trainers.core_cocktail as cc
from fun_audio_chat import FunAudioChatForConditionalGeneration
from fun_audio_chat.trainers import CoreCocktailCallback, FunAudioChatTrainer, read_manifest, run_core_cocktail
from fun_audio_chat.trainers.merging import SafetensorsCheckpoint

from .helpers import base_llm_checkpoint, collate, oracle_examples, oracle_model, train_dataset, training_args

LLM = "language_model."


def cosine(step, total, peak, floor):
    """HF ``cosine_with_min_lr`` without warmup: the LR used by optimizer step ``step`` (0-based)."""
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * step / total))


class Snapshot(TrainerCallback):
    """Copies the weights at the end of training (registered before the merge callback, so: pre-merge)."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}


class RecordLR(TrainerCallback):
    def __init__(self):
        self.lrs: dict[str, list[float]] = {}
        self.final: dict[str, float] = {}

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.setdefault(args.output_dir.rsplit("/", 1)[-1], []).append(optimizer.param_groups[0]["lr"])

    def on_train_end(self, args, state, control, lr_scheduler=None, **kwargs):
        self.final[args.output_dir.rsplit("/", 1)[-1]] = lr_scheduler.get_last_lr()[0]


def fast_args(**overrides):
    args = dict(
        per_device_train_batch_size=2,
        max_steps=4,
        logging_steps=1,
        save_steps=2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    args.update(overrides)
    return args


# ---------------------------------------------------------------------------------------------- callback


def test_callback_merges_at_train_end_and_saves(tmp_path):
    model = oracle_model()
    base_dir = base_llm_checkpoint(model, tmp_path / "base")
    base = SafetensorsCheckpoint(base_dir)
    snap = Snapshot()
    merger = CoreCocktailCallback(base=str(base_dir), alpha=0.5, save_dir=tmp_path / "merged")
    trainer = FunAudioChatTrainer(
        model=model,
        args=training_args(tmp_path / "run", max_steps=2),
        train_dataset=train_dataset(),
        data_collator=collate,
        callbacks=[snap, merger],
    )
    trainer.train()
    assert merger.merged
    trained = snap.weights
    for name, value in model.state_dict().items():
        if name.startswith(LLM):
            want = 0.5 * trained[name] + 0.5 * base.get(name[len(LLM) :])
            torch.testing.assert_close(value, want, atol=0, rtol=0)
        else:
            assert torch.equal(value, trained[name]), name
    assert model.audio_invert_tower.lm_head.weight is model.audio_tower.embed_tokens.weight
    # the saved merged checkpoint: manifest + loadable, equal to the in-memory result
    manifest = read_manifest(tmp_path / "merged")
    assert manifest["alpha"] == 0.5 and manifest["global_step"] == 2 and manifest["base"] == str(base_dir)
    assert all(n.startswith(LLM) for n in manifest["merged"])
    reloaded = FunAudioChatForConditionalGeneration.from_pretrained(tmp_path / "merged")
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name


def test_callback_merge_at_step_merges_once(tmp_path, monkeypatch):
    calls = []
    real = cc.merge_weights
    monkeypatch.setattr(cc, "merge_weights", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = oracle_model()
    base_dir = base_llm_checkpoint(model, tmp_path / "base")
    merger = CoreCocktailCallback(base=base_dir, merge_at_step=2)
    args = training_args(tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=2)
    FunAudioChatTrainer(
        model=model, args=args, train_dataset=train_dataset(), data_collator=collate, callbacks=[merger]
    ).train()
    assert calls == [1] and merger.manifest["global_step"] == 2
    # resuming from the checkpoint saved at the merge step continues without merging again
    merger2 = CoreCocktailCallback(base=base_dir, merge_at_step=2)
    model2 = oracle_model()
    FunAudioChatTrainer(
        model=model2, args=args, train_dataset=train_dataset(), data_collator=collate, callbacks=[merger2]
    ).train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert calls == [1] and not merger2.merged
    for name, value in model2.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[name], atol=1e-6, rtol=1e-5, msg=name)


# ------------------------------------------------------------------------------------------------ runner


def full_loss(model):
    with torch.no_grad():
        return model.eval()(**collate(oracle_examples())).loss.item()


def test_two_stage_run_follows_the_schedule_and_lowers_the_loss(tmp_path):
    model = oracle_model()
    initial = full_loss(model)
    base_dir = base_llm_checkpoint(model, tmp_path / "base")  # M0 = the LLM the model started from
    lr = RecordLR()
    result = run_core_cocktail(
        model,
        base_dir,
        train_dataset(),
        tmp_path / "cc",
        data_collator=collate,
        callbacks=[lr],
        stage1_args=fast_args(max_steps=5),
        stage2_args=fast_args(max_steps=4),
    )
    # stage 1: cosine 1e-4 -> 1e-5 over 5 steps; stage 2: 1e-5 -> 1e-6 over 4 steps (library defaults)
    s1, s2 = lr.lrs["stage1"], lr.lrs["stage2"]
    assert len(s1) == 5 and len(s2) == 4
    assert s1[0] == pytest.approx(1e-4, rel=1e-12) and s1[-1] == pytest.approx(cosine(4, 5, 1e-4, 1e-5), rel=1e-12)
    assert s2[0] == pytest.approx(1e-5, rel=1e-12) and s2[-1] == pytest.approx(cosine(3, 4, 1e-5, 1e-6), rel=1e-12)
    assert all(a > b for a, b in zip(s1, s1[1:])) and all(a > b for a, b in zip(s2, s2[1:]))
    assert lr.final["stage1"] == pytest.approx(1e-5, rel=1e-12) and lr.final["stage2"] == pytest.approx(1e-6, rel=1e-12)
    # the merge happened once, between the stages, and is recorded
    assert result.manifest["alpha"] == 0.5 and (tmp_path / "cc" / "merged" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "cc" / "core_cocktail_state.json").read_text())["status"] == "done"
    # training lowered the loss (text and speech logged separately in both stages)
    final = full_loss(model)
    assert final < initial - 0.3, (initial, final)
    for stage in ("stage1", "stage2"):
        logs = [h for h in result.log_history[stage] if "loss" in h]
        assert logs and all("text_loss" in h and "speech_loss" in h for h in logs)
    assert [h["loss"] for h in result.log_history["stage1"] if "loss" in h][-1] < initial


class CountSteps(TrainerCallback):
    def __init__(self):
        self.steps = {"stage1": [], "stage2": []}

    def on_step_end(self, args, state, control, **kwargs):
        self.steps[args.output_dir.rsplit("/", 1)[-1]].append(state.global_step)


class Interrupt(Exception):
    pass


class InterruptAt(TrainerCallback):
    """Simulates a crash: after the checkpoint of ``step`` in ``stage`` is written, or when ``stage`` begins."""

    def __init__(self, stage, step=None):
        self.stage, self.step = stage, step

    def _here(self, args):
        return args.output_dir.endswith("/" + self.stage)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.step is None and self._here(args):
            raise Interrupt(f"{self.stage} begin")

    def on_save(self, args, state, control, **kwargs):
        if self.step is not None and self._here(args) and state.global_step == self.step:
            raise Interrupt(f"{self.stage} step {self.step}")


def test_resume_from_any_point_gives_the_uninterrupted_result(tmp_path, monkeypatch):
    calls = []
    real = cc.merge_weights
    monkeypatch.setattr(cc, "merge_weights", lambda *a, **k: calls.append(1) or real(*a, **k))
    base_dir = base_llm_checkpoint(oracle_model(), tmp_path / "base")
    stage1, stage2 = fast_args(learning_rate=1e-3, min_lr=1e-4), fast_args(learning_rate=3e-4, min_lr=3e-5)

    def run(out, *extra):
        model = oracle_model()  # a fresh process: same initial weights
        run_core_cocktail(
            model,
            base_dir,
            train_dataset(),
            out,
            data_collator=collate,
            callbacks=list(extra),
            stage1_args=stage1,
            stage2_args=stage2,
        )
        return model

    reference = run(tmp_path / "ref")
    assert calls == [1]
    calls.clear()

    out = tmp_path / "resumed"
    counter = CountSteps()
    # kills mid-stage, right after each stage's final checkpoint (before the merge / the final save), and at the
    # start of stage 2
    for crash in (
        InterruptAt("stage1", step=2),
        InterruptAt("stage1", step=4),
        InterruptAt("stage2"),
        InterruptAt("stage2", step=2),
        InterruptAt("stage2", step=4),
    ):
        with pytest.raises(Interrupt):
            run(out, crash, counter)
    assert calls == [1]  # merged exactly once, when stage 1 finished after its resumption
    assert read_manifest(out / "merged")["alpha"] == 0.5
    # the merge of the finished stage-1 checkpoint records the step an uninterrupted run records
    assert (
        read_manifest(out / "merged")["global_step"] == read_manifest(tmp_path / "ref" / "merged")["global_step"] == 4
    )
    resumed = run(out, counter)
    assert calls == [1]  # never merged again
    # every optimizer step ran exactly once over the four processes: nothing redone, nothing skipped
    assert counter.steps == {"stage1": [1, 2, 3, 4], "stage2": [1, 2, 3, 4]}
    for name, value in resumed.state_dict().items():
        torch.testing.assert_close(value, reference.state_dict()[name], atol=1e-6, rtol=1e-5, msg=name)
    # a finished run only reloads its result
    again = run(out, InterruptAt("stage1"), InterruptAt("stage2"))
    assert calls == [1]
    for name, value in again.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


_PUSH_WORKER = """
import json, sys
from pathlib import Path
root, out = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(root))
import torch
from huggingface_hub import HfApi, snapshot_download
from fun_audio_chat import FunAudioChatForConditionalGeneration
from fun_audio_chat.trainers import CoreCocktailCallback, FunAudioChatTrainer
from tests.trainers.helpers import base_llm_checkpoint, collate, oracle_model, train_dataset, training_args

model = oracle_model()
base_dir = base_llm_checkpoint(model, out.parent / "base")
merger = CoreCocktailCallback(base=base_dir, alpha=0.25, push_to_hub=True, hub_model_id="me/merged")
FunAudioChatTrainer(model=model, args=training_args(out.parent / "run", max_steps=1), train_dataset=train_dataset(),
                    data_collator=collate, callbacks=[merger]).train()
files = sorted(HfApi().list_repo_files("me/merged"))
commits = [c.title for c in HfApi().list_repo_commits("me/merged")]
pulled = FunAudioChatForConditionalGeneration.from_pretrained("me/merged")
same = all(torch.equal(v, pulled.state_dict()[k]) for k, v in model.state_dict().items())
card = (Path(snapshot_download("me/merged")) / "README.md").read_text()
out.write_text(json.dumps({"files": files, "commits": commits, "same": same, "card": card}))
"""


def test_callback_pushes_the_merged_checkpoint(tmp_path):
    """Against the local hub-compatible server: the merged model lands on the Hub and loads back unchanged."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hub_server import LocalHubServer

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "report.json"
    with LocalHubServer(lifetime=200) as server:
        env = {**os.environ, **server.client_env(tmp_path / "hf_home"), "TQDM_DISABLE": "1"}
        proc = subprocess.run(
            [sys.executable, "-c", _PUSH_WORKER, str(root), str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert {"config.json", "model.safetensors", "merge_manifest.json", "README.md"} <= set(report["files"])
    assert any("alpha=0.25" in title for title in report["commits"])
    assert report["same"], "the pulled checkpoint must equal the merged model"
    assert "Core-Cocktail" in report["card"] or "merge" in report["card"].lower()
    with pytest.raises(ValueError, match="hub_model_id"):
        CoreCocktailCallback(base=tmp_path, push_to_hub=True)


def test_stage_arguments_defaults_and_overrides(tmp_path):
    from fun_audio_chat.trainers import core_cocktail_training_arguments

    a1 = core_cocktail_training_arguments(1, tmp_path / "s1")
    a2 = core_cocktail_training_arguments(2, tmp_path / "s2", {"min_lr": 2e-6, "num_train_epochs": 2})
    # the floor is passed as a ratio of the peak (`min_lr` needs `optimizer.defaults`, which DeepSpeed lacks)
    assert (a1.learning_rate, str(a1.lr_scheduler_type)) == (1e-4, "SchedulerType.COSINE_WITH_MIN_LR")
    assert a1.lr_scheduler_kwargs["min_lr_rate"] * a1.learning_rate == pytest.approx(1e-5)
    assert "min_lr" not in a1.lr_scheduler_kwargs
    assert (a2.learning_rate, a2.num_train_epochs) == (1e-5, 2)
    assert a2.lr_scheduler_kwargs["min_lr_rate"] * a2.learning_rate == pytest.approx(2e-6)
    a3 = core_cocktail_training_arguments(1, tmp_path / "s3", {"lr_scheduler_type": "linear"})
    assert a3.lr_scheduler_kwargs == {}
