"""Core-Cocktail merge: exact math in memory and on disk, untouched audio tensors, ties, atomicity, memory."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3ForCausalLM

from fun_audio_chat import FunAudioChatForConditionalGeneration
from fun_audio_chat.tiny import tiny_config
from fun_audio_chat.trainers import PickleCheckpointError, merge_weights, read_manifest
from fun_audio_chat.trainers import merging as merging_module
from fun_audio_chat.trainers.merging import SafetensorsCheckpoint, default_base_key_map
from fun_audio_chat.trainers.merging import merge as merge_module
from fun_audio_chat.trainers.merging import output as merge_output

LLM = "language_model."
SRH_TIED = "audio_invert_tower.lm_head.weight"
SPEECH_EMB = "audio_tower.embed_tokens.weight"


def expected(tuned: torch.Tensor, base: torch.Tensor, alpha: float) -> torch.Tensor:
    """The definition: alpha * M1 + (1 - alpha) * M0 in fp32, cast back to the tuned dtype."""
    return (alpha * tuned.float() + (1 - alpha) * base.float()).to(tuned.dtype)


def make_pair(dtype=torch.float32, seed=0):
    """A tuned tiny Fun-Audio-Chat model and an (unrelated, random) base Qwen3 LLM of the same shape."""
    torch.manual_seed(seed)
    tuned = FunAudioChatForConditionalGeneration(tiny_config()).to(dtype)
    base = Qwen3ForCausalLM(tiny_config().text_config).to(dtype)
    return tuned, base


def check_merged(merged: dict, tuned: dict, base: dict, alpha: float):
    n_merged = 0
    for name, value in merged.items():
        if name.startswith(LLM):
            want = expected(tuned[name], base[name[len(LLM) :]], alpha)
            n_merged += 1
        else:
            want = tuned[name]
        assert value.dtype == tuned[name].dtype, name
        assert torch.equal(value, want), name
    assert n_merged == len(base)
    return n_merged


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_state_dict_merge_is_exact(alpha, dtype):
    tuned_model, base_model = make_pair(dtype)
    tuned = tuned_model.state_dict()
    base = base_model.state_dict()
    before = {k: v.clone() for k, v in tuned.items()}
    merged, manifest = merge_weights(tuned, base, alpha, chunk_elements=777)
    check_merged(merged, before, base, alpha)
    # inputs untouched, non-LLM tensors are the very same tensors, ties kept
    assert all(torch.equal(tuned[k], before[k]) for k in tuned)
    assert merged["continuous_audio_tower.conv1.weight"] is tuned["continuous_audio_tower.conv1.weight"]
    assert merged[SRH_TIED] is merged[SPEECH_EMB]
    assert manifest["alpha"] == alpha
    assert sorted(manifest["merged"]) == sorted(LLM + k for k in base)
    assert not any(k.startswith(LLM) for k in manifest["kept_from_tuned"])
    if alpha == 1.0:
        assert all(torch.equal(merged[k], before[k]) for k in merged)
    if alpha == 0.0:
        assert all(torch.equal(merged[LLM + k], v) for k, v in base.items())


def test_merge_alpha_0_3_and_mixed_dtypes():
    # base stored in bf16, tuned in fp32: arithmetic in fp32, result in the tuned dtype
    tuned_model, base_model = make_pair(torch.float32)
    base = {k: v.to(torch.bfloat16) for k, v in base_model.state_dict().items()}
    tuned = tuned_model.state_dict()
    merged = merge_weights(tuned, base, 0.3).merged
    check_merged(merged, tuned, base, 0.3)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_in_place_model_merge(alpha):
    tuned_model, base_model = make_pair()
    before = {k: v.clone() for k, v in tuned_model.state_dict().items()}
    result = merge_weights(tuned_model, base_model, alpha)
    assert result.merged is tuned_model
    assert result.manifest["alpha"] == alpha
    after = tuned_model.state_dict()
    check_merged(after, before, base_model.state_dict(), alpha)
    assert tuned_model.audio_invert_tower.lm_head.weight is tuned_model.audio_tower.embed_tokens.weight


def test_base_key_map_layouts():
    assert (
        default_base_key_map("model.layers.0.mlp.up_proj.weight") == "language_model.model.layers.0.mlp.up_proj.weight"
    )
    assert default_base_key_map("lm_head.weight") == "language_model.lm_head.weight"
    assert default_base_key_map("model.language_model.norm.weight") == "language_model.model.norm.weight"
    assert default_base_key_map("model.visual.blocks.0.attn.qkv.weight") is None
    assert default_base_key_map("language_model.model.norm.weight") == "language_model.model.norm.weight"
    assert default_base_key_map("audio_tower.embed_tokens.weight") is None


def test_unrelated_base_is_an_error():
    tuned_model, _ = make_pair()
    with pytest.raises(ValueError, match="shares no tensor"):
        merge_weights(tuned_model.state_dict(), {"foo.weight": torch.zeros(3)}, 0.5)
    with pytest.raises(ValueError, match="alpha"):
        merge_weights(tuned_model.state_dict(), {}, 1.5)


def test_shape_mismatch():
    tuned_model, base_model = make_pair()
    base = dict(base_model.state_dict())
    base["lm_head.weight"] = torch.zeros(10, 64)
    with pytest.raises(ValueError, match="shape mismatch"):
        merge_weights(tuned_model.state_dict(), base, 0.5)
    merged, manifest = merge_weights(tuned_model.state_dict(), base, 0.5, on_shape_mismatch="keep_tuned")
    assert torch.equal(merged[LLM + "lm_head.weight"], tuned_model.state_dict()[LLM + "lm_head.weight"])
    assert manifest["shape_mismatch_kept"] == [LLM + "lm_head.weight"]


# ------------------------------------------------------------------------------------------------ on disk


def save_pair(tmp_path: Path, dtype, shard="24KB"):
    tuned_model, base_model = make_pair(dtype)
    tuned_dir, base_dir = tmp_path / "tuned", tmp_path / "base"
    tuned_model.save_pretrained(tuned_dir, max_shard_size=shard)
    base_model.save_pretrained(base_dir, max_shard_size=shard)
    (tuned_dir / "processor_config.json").write_text('{"processor_class": "FunAudioChatProcessor"}')
    (tuned_dir / "speech_tokenizer").mkdir()
    (tuned_dir / "speech_tokenizer" / "tokenizer_config.json").write_text("{}")
    (tuned_dir / "optimizer.pt").write_bytes(b"not copied")
    return tuned_model, base_model, tuned_dir, base_dir


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_on_disk_sharded_merge_is_exact(tmp_path, alpha, dtype):
    tuned_model, base_model, tuned_dir, base_dir = save_pair(tmp_path, dtype)
    shards = sorted(p.name for p in tuned_dir.glob("*.safetensors"))
    assert len(shards) > 3 and len(list(base_dir.glob("*.safetensors"))) > 3  # really sharded
    out = merge_weights(tuned_dir, base_dir, alpha, output_dir=tmp_path / "merged", chunk_elements=1000).merged
    assert out == tmp_path / "merged"
    # same layout and key set as the tuned checkpoint (tied SRH head omitted, as on input)
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert (
        json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        == json.loads((tuned_dir / "model.safetensors.index.json").read_text())["weight_map"]
    )
    merged = SafetensorsCheckpoint(out)
    assert SRH_TIED not in merged.keys()
    # the streamed writer produces files the official safetensors reader accepts
    merged_sd = {}
    for shard in shards:
        merged_sd.update(load_file(str(out / shard)))
    tuned_sd = {k: v for k, v in tuned_model.state_dict().items() if k != SRH_TIED}
    assert merged_sd.keys() == tuned_sd.keys()
    check_merged(merged_sd, tuned_sd, base_model.state_dict(), alpha)
    # equals the in-memory merge
    in_memory = merge_weights(tuned_sd, base_model.state_dict(), alpha).merged
    assert all(torch.equal(in_memory[k], merged_sd[k]) for k in merged_sd)
    # manifest, config and processor files; training state is not copied
    manifest = read_manifest(out)
    assert manifest["alpha"] == alpha and manifest["tuned"] == str(tuned_dir) and manifest["base"] == str(base_dir)
    assert sorted(manifest["merged"]) == sorted(LLM + k for k in base_model.state_dict())
    assert {"config.json", "generation_config.json", "processor_config.json"} <= {p.name for p in out.iterdir()}
    assert (out / "speech_tokenizer" / "tokenizer_config.json").is_file()
    assert not (out / "optimizer.pt").exists()
    # loads as a model, dtype kept, the SRH head re-tied
    model = FunAudioChatForConditionalGeneration.from_pretrained(out, dtype=dtype)
    assert model.audio_invert_tower.lm_head.weight.data_ptr() == model.audio_tower.embed_tokens.weight.data_ptr()
    assert torch.equal(model.language_model.lm_head.weight, merged_sd[LLM + "lm_head.weight"])


def test_on_disk_single_files_and_tied_base(tmp_path):
    """Unsharded inputs, and a base LLM with tied embeddings (its checkpoint has no lm_head)."""
    tuned_model, _ = make_pair()
    tuned_model.save_pretrained(tmp_path / "tuned")
    config = tiny_config().text_config
    config.tie_word_embeddings = True
    base = Qwen3ForCausalLM(config)
    base.save_pretrained(tmp_path / "base")
    assert "lm_head.weight" not in SafetensorsCheckpoint(tmp_path / "base").keys()
    out = merge_weights(tmp_path / "tuned", tmp_path / "base", 0.5, output_dir=tmp_path / "out").merged
    merged = load_file(str(out / "model.safetensors"))
    emb = base.model.embed_tokens.weight.detach()
    assert torch.equal(merged[LLM + "lm_head.weight"], expected(tuned_model.language_model.lm_head.weight, emb, 0.5))


def test_on_disk_tuned_with_in_memory_base(tmp_path):
    tuned_model, base_model = make_pair(torch.bfloat16)
    tuned_model.save_pretrained(tmp_path / "tuned", max_shard_size="40KB")
    out = merge_weights(tmp_path / "tuned", base_model, 0.5, output_dir=tmp_path / "out", chunk_elements=333).merged
    merged = SafetensorsCheckpoint(out)
    tuned_sd = {k: v for k, v in tuned_model.state_dict().items() if k != SRH_TIED}
    check_merged({k: merged.get(k) for k in merged.keys()}, tuned_sd, base_model.state_dict(), 0.5)
    assert read_manifest(out)["base"] == "<in-memory Qwen3ForCausalLM>"


def test_refuses_pickle_checkpoints(tmp_path):
    tuned_model, base_model = make_pair()
    (tmp_path / "pickled").mkdir()
    torch.save(base_model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    tuned_model.save_pretrained(tmp_path / "tuned")
    with pytest.raises(PickleCheckpointError, match="pickle"):
        merge_weights(tmp_path / "tuned", tmp_path / "pickled", 0.5, output_dir=tmp_path / "out")
    with pytest.raises(PickleCheckpointError):
        merge_weights(tmp_path / "pickled" / "pytorch_model.bin", base_model, 0.5, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    _, _, tuned_dir, base_dir = save_pair(tmp_path, torch.float32)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        merge_weights(tuned_dir, base_dir, 0.5, output_dir=out)
    assert (out / "keep.txt").is_file()
    merge_weights(tuned_dir, base_dir, 0.5, output_dir=out, overwrite=True)
    assert not (out / "keep.txt").exists() and read_manifest(out)["alpha"] == 0.5


def test_manifest_extra_entries_in_every_kind_of_merge(tmp_path):
    tuned, base, tuned_dir, base_dir = save_pair(tmp_path, torch.float32)
    _, on_disk = merge_weights(tuned_dir, base_dir, 0.5, output_dir=tmp_path / "m", manifest_extra={"global_step": 7})
    assert on_disk["global_step"] == read_manifest(tmp_path / "m")["global_step"] == 7
    _, in_memory = merge_weights(tuned, base, 0.5, manifest_extra={"global_step": 3}, show_progress=False)
    assert in_memory["global_step"] == 3


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".merged")]


def test_interrupted_merge_leaves_no_partial_output(tmp_path, monkeypatch):
    _, _, tuned_dir, base_dir = save_pair(tmp_path, torch.float32)
    calls = []

    def boom(name):
        calls.append(name)
        if len(calls) == 20:  # some shards are complete, one is half written
            raise KeyboardInterrupt

    monkeypatch.setattr(merge_module, "_tensor_merged", boom)
    with pytest.raises(KeyboardInterrupt):
        merge_weights(tuned_dir, base_dir, 0.5, output_dir=tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert _leftovers(tmp_path) == []


# The subprocesses load the merging package on its own (it needs only torch): importing the whole package would triple
# their start-up time on a busy machine without changing what is measured.
LOAD_MERGING = textwrap.dedent(
    f"""
    import importlib.util, sys
    _spec = importlib.util.spec_from_file_location(
        "merging", {str(Path(merging_module.__file__))!r},
        submodule_search_locations=[{str(Path(merging_module.__file__).parent)!r}],
    )
    merging = sys.modules["merging"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(merging)
    merge_weights = merging.merge_weights
    """
)


def test_killed_merge_leaves_no_output(tmp_path):
    """A process killed mid-merge (SIGKILL: no cleanup at all) never leaves a merged directory behind."""
    _, _, tuned_dir, base_dir = save_pair(tmp_path, torch.float32)
    script = LOAD_MERGING + textwrap.dedent(
        f"""
        import os, signal
        seen = []
        def hook(name):
            seen.append(name)
            if len(seen) == 20:
                os.kill(os.getpid(), signal.SIGKILL)
        merging.merge._tensor_merged = hook
        merge_weights({str(tuned_dir)!r}, {str(base_dir)!r}, 0.5, output_dir={str(tmp_path / "merged")!r},
                      show_progress=False)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not (tmp_path / "merged").exists()
    (stale,) = _leftovers(tmp_path)
    # folders we did not write (no marker) or of a merge still running (live process) are never removed
    foreign = tmp_path / ".merged.partial-123-user"
    foreign.mkdir()
    running = tmp_path / ".merged.partial-running"
    running.mkdir()
    merge_output._write_partial_marker(running)
    # a rerun succeeds and removes the stale temporary sibling of the killed merge
    merge_weights(tuned_dir, base_dir, 0.5, output_dir=tmp_path / "merged", show_progress=False)
    assert read_manifest(tmp_path / "merged") is not None
    assert sorted(_leftovers(tmp_path)) == sorted([foreign.name, running.name]) and stale not in _leftovers(tmp_path)
    assert not (tmp_path / "merged" / merge_output._PARTIAL_MARKER).exists()


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "output",
    ["base", "tuned", "parent", "inside-tuned", "inside-base", "base-file-dir"],
)
def test_output_that_is_contains_or_lies_inside_an_input_is_refused_untouched(tmp_path, output):
    root = tmp_path / "work"
    root.mkdir()
    _, base_model, tuned_dir, base_dir = save_pair(root, torch.float32)
    out = {
        "base": base_dir,
        "tuned": tuned_dir,
        "parent": root,
        "inside-tuned": tuned_dir / "merged",
        "inside-base": base_dir / "sub" / "merged",
        "base-file-dir": base_dir,
    }[output]
    base = base_dir / "model.safetensors.index.json" if output == "base-file-dir" else base_dir
    before = _snapshot(root)
    with pytest.raises(ValueError, match="output_dir .* (is|contains|lies inside) the (tuned|base) checkpoint"):
        merge_weights(tuned_dir, base, 0.5, output_dir=out, overwrite=True, show_progress=False)
    assert _snapshot(root) == before
    assert sorted(p.name for p in root.iterdir()) == ["base", "tuned"]
    # an in-memory tuned model saved over its base checkpoint is refused the same way
    tuned_model, _ = make_pair()
    with pytest.raises(ValueError, match="the base checkpoint"):
        merge_weights(tuned_model, base_dir, 0.5, output_dir=base_dir, overwrite=True, show_progress=False)
    assert _snapshot(root) == before


def test_missing_base_is_never_looked_up_on_the_hub_unless_asked(tmp_path, monkeypatch):
    import huggingface_hub

    _, _, tuned_dir, base_dir = save_pair(tmp_path, torch.float32)
    asked = []

    def fake_snapshot_download(repo_id, **kwargs):
        asked.append(repo_id)
        return str(base_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(FileNotFoundError, match="base checkpoint 'runs/base' not found on disk.*base_from_hub=True"):
        merge_weights(tuned_dir, "runs/base", 0.5, output_dir=tmp_path / "out", show_progress=False)
    with pytest.raises(FileNotFoundError, match="tuned checkpoint 'runs/tuned' not found"):
        merge_weights("runs/tuned", base_dir, 0.5, output_dir=tmp_path / "out", show_progress=False)
    assert asked == [] and not (tmp_path / "out").exists()
    merge_weights(tuned_dir, "org/base", 0.5, output_dir=tmp_path / "out", show_progress=False, base_from_hub=True)
    assert asked == ["org/base"] and read_manifest(tmp_path / "out") is not None


# ------------------------------------------------------------------------------------------ peak memory

SHARDS, TENSORS_PER_SHARD, ROWS, COLS = 4, 4, 1024, 1024  # fp32: 4 MiB tensors, 16 MiB shards, 64 MiB total
SHARD_BYTES = TENSORS_PER_SHARD * ROWS * COLS * 4
RSS_BOUND = 2 * SHARD_BYTES  # the stated bound: two shards (32 MiB) above the pre-merge RSS


def _write_sharded(directory: Path, prefix: str, seed: int):
    directory.mkdir()
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for s in range(SHARDS):
        name = f"model-{s + 1:05d}-of-{SHARDS:05d}.safetensors"
        tensors = {}
        for t in range(TENSORS_PER_SHARD):
            key = f"{prefix}layers.{s * TENSORS_PER_SHARD + t}.mlp.up_proj.weight"
            tensors[key] = torch.randn(ROWS, COLS, generator=gen)
            weight_map[key] = name
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": SHARDS * SHARD_BYTES}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def test_on_disk_merge_peak_rss_is_bounded(tmp_path):
    """Peak RSS of a 4-shard (64 MiB tuned + 64 MiB base) merge stays < 2 shards above the starting RSS.

    Measured in a fresh subprocess from /proc/self/status: VmRSS just before the merge (after imports and a
    warm-up merge), then the high-water mark VmHWM (reset via /proc/self/clear_refs where allowed).
    ``getrusage().ru_maxrss`` is not used: Linux carries it over from the parent across fork/exec. A merge that
    loaded the checkpoints would need > 128 MiB.
    """
    _write_sharded(tmp_path / "tuned", "language_model.model.", seed=1)
    _write_sharded(tmp_path / "base", "model.", seed=2)
    script = LOAD_MERGING + textwrap.dedent(
        f"""
        import json, torch
        def status_kib(field):
            for line in open("/proc/self/status"):
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        torch.set_num_threads(1)
        # warm-up: import everything the merge touches, on small tensors
        merge_weights({{"language_model.model.w": torch.ones(4)}}, {{"model.w": torch.zeros(4)}}, 0.5,
                      show_progress=False)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak-RSS counter
        except OSError:
            pass
        before = status_kib("VmRSS")
        merge_weights({str(tmp_path / "tuned")!r}, {str(tmp_path / "base")!r}, 0.5,
                      output_dir={str(tmp_path / "merged")!r}, show_progress=False, chunk_elements=1 << 18)
        print(json.dumps({{"before_kib": before, "peak_kib": status_kib("VmHWM")}}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    print("on-disk merge peak RSS above start:", stats)
    extra = (stats["peak_kib"] - stats["before_kib"]) * 1024
    assert extra < RSS_BOUND, (
        f"merge used {extra / 2**20:.1f} MiB above its starting RSS (bound {RSS_BOUND / 2**20} MiB)"
    )
    # and the result is right
    merged = SafetensorsCheckpoint(tmp_path / "merged")
    tuned, base = SafetensorsCheckpoint(tmp_path / "tuned"), SafetensorsCheckpoint(tmp_path / "base")
    for key in (
        "language_model.model.layers.0.mlp.up_proj.weight",
        "language_model.model.layers.15.mlp.up_proj.weight",
    ):
        assert torch.equal(merged.get(key), expected(tuned.get(key), base.get(key[len(LLM) :]), 0.5))


def test_saving_a_merged_model_over_its_base_is_refused(tmp_path):
    """The path of the Core-Cocktail callback: merge in memory, then save_merged_model(save_dir)."""
    from fun_audio_chat.trainers import save_merged_model

    _, _, tuned_dir, base_dir = save_pair(tmp_path, torch.float32)
    tuned_model, _ = make_pair()
    before = _snapshot(base_dir)
    _, manifest = merge_weights(tuned_model, base_dir, 0.5, show_progress=False)
    for target in (base_dir, tmp_path, base_dir / "inside"):
        with pytest.raises(ValueError, match="the base checkpoint"):
            save_merged_model(tuned_model, target, manifest, overwrite=True)
    assert _snapshot(base_dir) == before
    save_merged_model(tuned_model, tmp_path / "merged", manifest)
    assert read_manifest(tmp_path / "merged")["base"] == manifest["base"]
