"""Loading: the official folder (yaml read as data, weights-only .pt), our converted folder, Hub ids, the real
checkpoint's key/shape list, and refusals of anything we do not understand."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fun_audio_chat import CosyVoice3Detokenizer
from fun_audio_chat.token2wav import CheckpointFormatError, CosyVoice3Config, config_from_official_yaml
from fun_audio_chat.token2wav.loading import official_flow_key, official_hift_key

from .conftest import FIXTURES, OFFICIAL_DIR

CODES = [5, 6000, 17, 3, 99, 1000, 6560, 0, 42, 7, 300, 301, 302, 2, 9, 4000, 12, 13, 14, 15, 16, 18, 19]


def test_official_yaml_is_interpreted_into_our_config():
    config = config_from_official_yaml((OFFICIAL_DIR / "config.yaml").read_text())
    flow, hift = config.flow, config.hift
    assert (flow.hidden_size, flow.num_layers, flow.num_heads, flow.head_dim, flow.ff_mult) == (64, 2, 2, 32, 2)
    assert (flow.pre_lookahead_channels, flow.chunk_frames, flow.cfg_rate, flow.vocab_size) == (32, 50, 0.7, 6561)
    assert (hift.base_channels, hift.f0_channels, hift.num_harmonics, hift.conv_pre_lookahead) == (32, 32, 8, 4)
    assert (hift.n_fft, hift.hop_length, hift.upsample_rates, hift.sample_rate) == (16, 4, [8, 5, 3], 24000)
    assert hift.samples_per_frame == 480


def test_official_and_converted_folders_give_identical_outputs(official_model, tmp_path):
    converted = tmp_path / "converted"
    official_model.save_pretrained(converted)
    assert {p.name for p in converted.iterdir()} == {"config.json", "model.safetensors"}
    reloaded = CosyVoice3Detokenizer.from_pretrained(converted)
    assert json.loads((converted / "config.json").read_text())["flow"]["hidden_size"] == 64
    for key, value in official_model.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key]), key
    assert torch.equal(official_model(CODES), reloaded(CODES))
    session_a, session_b = official_model.streaming_session(), reloaded.streaming_session()
    assert torch.equal(session_a.push(CODES), session_b.push(CODES))
    assert torch.equal(session_a.finish(), session_b.finish())


def test_official_default_speaker_is_the_fun_audio_chat_embedding(official_model):
    from safetensors.torch import load_file

    real = load_file(
        str(FIXTURES.parents[1].parent / "src/fun_audio_chat/assets/cosyvoice3_default_speaker.safetensors")
    )
    assert torch.equal(official_model.speaker_embedding, real["embedding"].reshape(1, 192))
    assert official_model.speaker_embedding.abs().sum() > 0


def test_real_checkpoint_keys_instantiate_on_meta_with_exact_keys_and_counts():
    listing = json.loads((FIXTURES / "real_size" / "checkpoint_keys.json").read_text())
    with torch.device("meta"):
        model = CosyVoice3Detokenizer(CosyVoice3Config())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    counts = {}
    for part, rename in (("flow", official_flow_key), ("hift", official_hift_key)):
        mapped = {f"{part}.{rename(key)}": tuple(shape) for key, shape, _ in listing[part]["keys"]}
        assert len(mapped) == listing[part]["num_keys"]  # the renaming is one-to-one
        own = {k: v for k, v in ours.items() if k.startswith(part + ".")}
        assert mapped == own
        parameters = sum(p.numel() for n, p in model.named_parameters() if n.startswith(part + "."))
        counts[part] = parameters
        assert parameters == listing[part]["num_parameters"]
    print(f"real-size parameters: flow {counts['flow']:,}, HiFT {counts['hift']:,}")
    assert counts == {"flow": 332_257_088, "hift": 20_779_887}


def _official_copy(tmp_path, yaml_text: str | None = None):
    folder = tmp_path / "official"
    shutil.copytree(OFFICIAL_DIR, folder)
    if yaml_text is not None:
        (folder / "config.yaml").write_text(yaml_text)
    return folder


YAML = (OFFICIAL_DIR / "config.yaml").read_text()


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("!new:cosyvoice.flow.flow.CausalMaskedDiffWithDiT", "!new:os.system", "class os.system is not a known"),
        ("!new:cosyvoice.flow.DiT.dit.DiT", "!new:cosyvoice.flow.DiT.dit.Evil", "not a known CosyVoice 3"),
        (
            "in_channels: 80\n    base_channels",
            "in_channels: !apply:os.getcwd []\n    base_channels",
            "tag !apply:os.getcwd is not allowed",
        ),
        ("nb_harmonics: 8", "nb_harmonics: !name:os.system", "tag !name:os.system is not allowed"),
        ("nb_harmonics: 8", "nb_harmonics: !!python/object/apply:os.system ['true']", "is not allowed"),
        ("ff_mult: 2", "ff_mult: 2\n            secret_flag: 1", "unknown argument(s) ['secret_flag']"),
        ("spk_embed_dim: !ref <spk_embed_dim>", "spk_embed_dim: !ref <nowhere>", "no top-level key 'nowhere'"),
        ("!ref <chunk_size> * <token_mel_ratio>", "!ref <chunk_size>.__class__", "only <key> references"),
        ("t_scheduler: 'cosine'", "t_scheduler: 'linear'", "t_scheduler='linear' is not supported"),
    ],
)
def test_yaml_tags_are_interpreted_never_executed(tmp_path, old, new, message):
    assert old in YAML
    folder = _official_copy(tmp_path, YAML.replace(old, new, 1))
    with pytest.raises(CheckpointFormatError) as caught:
        CosyVoice3Detokenizer.from_pretrained(folder)
    assert message in str(caught.value)


def test_tags_outside_flow_and_hift_stay_inert(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("os.getcwd", lambda: calls.append("called"))
    text = (
        YAML + "\nllm: !new:cosyvoice.llm.llm.Anything\n    x: !apply:os.getcwd []\n"
        "boom: !!python/object/apply:os.getcwd []\n"
    )
    model = CosyVoice3Detokenizer.from_pretrained(_official_copy(tmp_path, text))
    assert calls == [] and model.config.flow.hidden_size == 64


class NotATensor:
    pass


def test_pickled_objects_in_pt_files_are_refused(tmp_path):
    folder = _official_copy(tmp_path)
    state = torch.load(folder / "hift.pt", weights_only=True)
    state["payload"] = NotATensor()
    torch.save(state, folder / "hift.pt")
    with pytest.raises(CheckpointFormatError, match="not a plain tensor state dict"):
        CosyVoice3Detokenizer.from_pretrained(folder)


def test_mismatched_weights_and_unknown_folders_give_clear_errors(tmp_path):
    folder = _official_copy(tmp_path, YAML.replace("dim: 64", "dim: 96", 1))
    with pytest.raises(CheckpointFormatError, match="shape"):
        CosyVoice3Detokenizer.from_pretrained(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointFormatError, match="neither a converted detokenizer"):
        CosyVoice3Detokenizer.from_pretrained(tmp_path / "empty")
    with pytest.raises(CheckpointFormatError, match="no such folder"):
        CosyVoice3Detokenizer.from_pretrained(tmp_path / "missing" / "deeper")


@pytest.mark.parametrize("kind", ["official", "converted"])
def test_hub_id_fetches_only_the_needed_files(official_model, tmp_path, monkeypatch, kind):
    from huggingface_hub.errors import EntryNotFoundError

    if kind == "official":
        repo_dir = _official_copy(tmp_path)
        (repo_dir / "llm.pt").write_bytes(b"large and unneeded")
        expected = {"config.json", "cosyvoice3.yaml", "cosyvoice.yaml", "config.yaml", "flow.pt", "hift.pt"}
    else:
        repo_dir = tmp_path / "converted"
        official_model.save_pretrained(repo_dir)
        (repo_dir / "unrelated.bin").write_bytes(b"x")
        expected = {"config.json", "model.safetensors", "speaker_embedding.safetensors"}
    requested = []

    def fake_download(repo_id, filename, revision=None, **kwargs):
        assert repo_id == "someone/cosyvoice3"
        requested.append(filename)
        if not (repo_dir / filename).is_file():
            raise EntryNotFoundError(f"{filename} not in repo")
        return str(repo_dir / filename)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    model = CosyVoice3Detokenizer.from_pretrained("someone/cosyvoice3")
    assert set(requested) <= expected and "llm.pt" not in requested and "unrelated.bin" not in requested
    assert torch.equal(model(CODES[:8]), official_model(CODES[:8]))
