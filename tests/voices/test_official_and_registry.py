"""The released speakers' table (a synthetic ``new_spk2info.pt`` of the official layout) → voice files with their
full prompts, and the registry that serves voices by name."""

from __future__ import annotations

import pytest
import torch

from fun_audio_chat.token2wav import CosyVoice3Voice
from fun_audio_chat.voices import (
    DEFAULT_VOICE,
    UnknownVoiceError,
    VoiceRegistry,
    convert_official_speakers,
    find_official_speakers,
    read_official_speakers,
)

from .conftest import voiced_clip


def official_table(vocab: int = 296) -> dict:
    """Two speakers as the release stores them: embedding (1, 192), speech_token (1, T) int32 and speech_feat
    (1, T_mel, 80), where T_mel is not exactly 2·T (the official prompts are cut only when used)."""
    generator = torch.Generator().manual_seed(0)
    table = {}
    for name, tokens, frames in (("中文女", 50, 97), ("中文男", 40, 84)):
        table[name] = {
            "embedding": torch.randn(1, 192, generator=generator),
            "speech_token": torch.randint(0, vocab, (1, tokens), generator=generator, dtype=torch.int32),
            "speech_feat": torch.randn(1, frames, 80, generator=generator),
        }
    return table


def test_the_released_speakers_become_voices_with_their_full_prompts(tmp_path, tiny_detokenizer):
    table = official_table()
    (tmp_path / "official" / "utils").mkdir(parents=True)
    torch.save(table, tmp_path / "official" / "utils" / "new_spk2info.pt")
    assert find_official_speakers(tmp_path / "official") == tmp_path / "official" / "utils" / "new_spk2info.pt"
    written = convert_official_speakers(tmp_path / "official", tmp_path / "out", config=tiny_detokenizer.config)
    assert [path.name for path in written] == ["中文女.safetensors", "中文男.safetensors"]
    for path, (name, entry) in zip(written, table.items()):
        voice = CosyVoice3Voice.load(path)
        assert voice.name == name
        assert torch.equal(voice.speaker_embedding, entry["embedding"][0])
        # cut to a common length: min(97 // 2, 50) = 48 codes and 96 frames; min(84 // 2, 40) = 40 and 80
        count = min(entry["speech_feat"].shape[1] // 2, entry["speech_token"].shape[1])
        assert torch.equal(voice.prompt_codes, entry["speech_token"][0, :count].long())
        assert torch.equal(voice.prompt_mel, entry["speech_feat"][0, : 2 * count])
    registry = VoiceRegistry(config=tiny_detokenizer.config)
    assert registry.add_folder(tmp_path / "out") == ["中文女", "中文男"]
    assert registry.names == [DEFAULT_VOICE, "中文女", "中文男"]
    # an official folder that was not converted offers its speakers too (the table read the same way)
    official = VoiceRegistry(config=tiny_detokenizer.config)
    assert official.add_folder(tmp_path / "official") == ["中文女", "中文男"]
    assert torch.equal(official.get("中文男").prompt_mel, registry.get("中文男").prompt_mel)
    assert VoiceRegistry().add_folder(tmp_path / "official" / "utils" / "nothing") == []


def test_speakers_saved_by_add_zero_shot_spk_and_embedding_only_speakers_are_read(tmp_path):
    generator = torch.Generator().manual_seed(1)
    table = {
        "zero_shot": {
            "flow_embedding": torch.randn(1, 192, generator=generator),
            "llm_embedding": torch.randn(1, 192, generator=generator),
            "flow_prompt_speech_token": torch.randint(0, 6561, (1, 10), generator=generator, dtype=torch.int32),
            "prompt_speech_feat": torch.randn(1, 20, 80, generator=generator),
            "prompt_text": torch.zeros(1, 3, dtype=torch.int32),
        },
        "plain": {"embedding": torch.randn(1, 192, generator=generator)},
    }
    torch.save(table, tmp_path / "spk2info.pt")
    zero_shot, plain = read_official_speakers(tmp_path / "spk2info.pt")
    assert torch.equal(zero_shot.speaker_embedding, table["zero_shot"]["flow_embedding"][0])
    assert zero_shot.prompt_codes.shape == (10,) and zero_shot.prompt_mel.shape == (20, 80)
    assert plain.name == "plain" and not plain.has_prompt


class NotATensor:
    pass


@pytest.mark.parametrize(
    "content, message",
    [
        ({"x": {"embedding": NotATensor()}}, "weights_only=True"),
        ({"x": {"speech_token": torch.zeros(1, 4)}}, "no speaker embedding"),
        ({"x": {"embedding": torch.zeros(1, 192), "speech_token": torch.zeros(1, 4)}}, "no prompt mel"),
        ([torch.zeros(3)], "expected a dict"),
    ],
    ids=["pickled-code", "no-embedding", "half-a-prompt", "not-a-table"],
)
def test_bad_speaker_tables_are_refused(tmp_path, content, message):
    torch.save(content, tmp_path / "spk2info.pt")
    with pytest.raises(ValueError, match=message):
        read_official_speakers(tmp_path / "spk2info.pt")


def test_no_speaker_table_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no new_spk2info.pt or spk2info.pt"):
        convert_official_speakers(tmp_path, tmp_path / "out")


# ------------------------------------------------------------------------------------------------ registry
def test_resolve_maps_names_to_voices_and_unknown_names_list_the_known_ones(tiny_detokenizer):
    anna = CosyVoice3Voice.from_speaker_embedding("anna", torch.randn(192))
    registry = VoiceRegistry([anna], config=tiny_detokenizer.config)
    assert registry.resolve("anna") is anna
    for default in (None, "", "default", "alloy", "marin"):  # OpenAI's own names keep OpenAI clients working
        assert registry.resolve(default) is None
    with pytest.raises(UnknownVoiceError, match=r"unknown voice 'bob'; available voices: default, anna\.") as caught:
        registry.resolve("bob")
    assert caught.value.available == ["default", "anna"]
    registry.add(CosyVoice3Voice.from_speaker_embedding("alloy", torch.randn(192)))
    assert registry.resolve("alloy").name == "alloy"  # a registered voice wins over the alias


def test_registering_checks_the_voice_against_the_detokenizer(tiny_detokenizer):
    registry = VoiceRegistry(config=tiny_detokenizer.config)
    with pytest.raises(ValueError, match="192-value CAM"):
        registry.add(CosyVoice3Voice.from_speaker_embedding("small", torch.randn(64)))
    with pytest.raises(ValueError, match="reserved"):
        registry.add(CosyVoice3Voice.from_speaker_embedding("default", torch.randn(192)))
    assert registry.names == ["default"]


def test_specs_register_voice_files_and_clone_clips(tmp_path, tiny_cloner, tiny_detokenizer):
    import soundfile as sf

    saved = tiny_cloner.clone(voiced_clip(3.0), name="original", sampling_rate=16000)
    saved.save(tmp_path / "original.safetensors")
    sf.write(tmp_path / "carla.wav", voiced_clip(3.0, pitch=200, seed=4), 16000)
    made = []

    def cloner_factory():  # built only when a clip needs it
        made.append(1)
        return tiny_cloner

    registry = VoiceRegistry(config=tiny_detokenizer.config)
    renamed = registry.add_spec(f"dora={tmp_path / 'original.safetensors'}", cloner_factory)
    assert renamed.name == "dora" and torch.equal(renamed.prompt_mel, saved.prompt_mel) and not made
    cloned = registry.add_spec(f"carla={tmp_path / 'carla.wav'}", cloner_factory)
    assert cloned.name == "carla" and cloned.has_prompt and made == [1]
    assert registry.names == ["default", "dora", "carla"]
    with pytest.raises(ValueError, match="expected NAME=CLIP_OR_VOICE_FILE"):
        registry.add_spec(str(tmp_path / "carla.wav"))
    with pytest.raises(FileNotFoundError, match="voice eve: .*missing.wav not found"):
        registry.add_spec(f"eve={tmp_path / 'missing.wav'}")
    with pytest.raises(ValueError, match="no voice cloner"):
        registry.add_spec(f"fay={tmp_path / 'carla.wav'}")
