"""Training examples (official SFT layout) and FunAudioChatDataCollator: oracle tensors and loss, datasets + Trainer."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from fun_audio_chat.processing import DEFAULT_S2M_PROMPT, DEFAULT_S2T_PROMPT, FunAudioChatDataCollator

from .conftest import load_oracle, noise

ORACLE_LOSS = {"loss": 14.482991218566895, "text_loss": 7.242302417755127, "speech_loss": 7.240688800811768}
USER_SAMPLES = (27700, 41000)


def _oracle_rows(oracle) -> list[dict]:
    """The oracle train_b2 batch cut back into the per-sample rows a dataset would hold."""
    lengths = oracle["attention_mask"].sum(-1).tolist()
    speech_lengths = oracle["speech_attention_mask"].sum(-1).tolist()
    frames = oracle["feature_attention_mask"].sum(-1).tolist()
    rows = []
    for b in range(2):
        audio_rows = [2 * b, 2 * b + 1]  # [user audio, assistant audio]
        rows.append(
            {
                "input_ids": oracle["input_ids"][b, : lengths[b]].tolist(),
                "attention_mask": [1] * lengths[b],
                "labels": oracle["labels"][b, : lengths[b]].tolist(),
                "speech_ids": [oracle["speech_ids"][r, : speech_lengths[r]].tolist() for r in audio_rows],
                "text_ids": [
                    [t for t in oracle["text_ids"][r].tolist() if t != 500] if oracle["text_attention_mask"][r] else []
                    for r in audio_rows
                ],
                "text_attention_mask": [bool(oracle["text_attention_mask"][r]) for r in audio_rows],
                "feature_exist_mask": [bool(oracle["feature_exist_mask"][r]) for r in audio_rows],
                "input_features": [oracle["input_features"][b, :, : frames[b]].numpy()],
            }
        )
    return rows


def _spoken_conversation(b: int, oracle, transcript="hello there", seed=0):
    codes_row = 2 * b + 1
    n = int(oracle["speech_attention_mask"][codes_row].sum())
    codes = oracle["speech_ids"][codes_row, 10:n].tolist()
    return [
        {"role": "system", "content": "efghij"},  # = the oracle's system ids 101..106 in the tiny vocabulary
        {
            "role": "user",
            "content": [{"type": "audio", "audio": noise(USER_SAMPLES[b], seed=seed + b), "sampling_rate": 16000}],
        },
        {
            "role": "assistant",
            "content": [{"type": "text", "text": transcript}, {"type": "audio", "speech_codes": codes}],
        },
    ]


def test_collator_reproduces_oracle_train_b2_tensors(processor):
    oracle = load_oracle("train_b2")
    batch = FunAudioChatDataCollator(processor)(_oracle_rows(oracle))
    keys = {
        "input_ids",
        "attention_mask",
        "labels",
        "speech_ids",
        "speech_attention_mask",
        "text_ids",
        "text_attention_mask",
        "feature_exist_mask",
        "input_features",
        "feature_attention_mask",
    }
    assert set(batch) == keys
    for key in keys - {"input_features", "feature_attention_mask"}:
        assert batch[key].dtype == oracle[key].dtype, key
        assert torch.equal(batch[key], oracle[key]), key
    width = batch["input_features"].shape[-1]  # longest clip (257); the oracle padded to 260
    assert torch.equal(batch["feature_attention_mask"], oracle["feature_attention_mask"][:, :width])
    assert torch.equal(batch["input_features"], oracle["input_features"][..., :width])


def test_collated_batch_reproduces_oracle_train_b2_loss(processor, oracle_model_a):
    oracle = load_oracle("train_b2")
    batch = FunAudioChatDataCollator(processor)(_oracle_rows(oracle))
    config = oracle_model_a.config
    previous = config.halve_unpaired_audio_features
    config.halve_unpaired_audio_features = True  # the official training numbers halve user-audio features
    try:
        with torch.no_grad():
            out = oracle_model_a(**batch)
    finally:
        config.halve_unpaired_audio_features = previous
    assert out.loss.item() == pytest.approx(ORACLE_LOSS["loss"], abs=1e-4)
    assert out.text_loss.item() == pytest.approx(ORACLE_LOSS["text_loss"], abs=1e-4)
    assert out.speech_loss.item() == pytest.approx(ORACLE_LOSS["speech_loss"], abs=1e-4)


def test_training_example_layout_matches_oracle(processor):
    """build_training_example on the same conversation shape gives the oracle's ids, labels and audio rows."""
    oracle = load_oracle("train_b2")
    examples = [processor.build_training_example(_spoken_conversation(b, oracle)) for b in range(2)]
    ex = examples[0]
    assert ex["feature_exist_mask"] == [True, False] and ex["text_attention_mask"] == [False, True]
    assert ex["speech_ids"][1][:10] == [296] * 10  # speech-BOS delay
    assert ex["text_ids"] == [[], processor.tokenizer("hello there")["input_ids"]]
    assert [f.shape for f in ex["input_features"]] == [(128, 174)]
    batch = FunAudioChatDataCollator(processor)(examples)
    for key in (
        "input_ids",
        "attention_mask",
        "labels",
        "speech_ids",
        "speech_attention_mask",
        "feature_exist_mask",
        "text_attention_mask",
    ):
        assert torch.equal(batch[key], oracle[key]), key
    assert batch["feature_attention_mask"].sum(-1).tolist() == [174, 257]
    # the reply span: <|audio_bos|> <|AUDIO|>*8 <|audio_eos|> <|im_end|> \n, labelled; the prompt is not
    labels = batch["labels"][0]
    span = (labels != -100).nonzero().flatten().tolist()
    assert batch["input_ids"][0, span].tolist() == [503] + [505] * 8 + [504, 502, 198]


def test_training_prompt_is_what_the_processor_call_encodes(processor):
    """The example's prompt part (ids, the user audio row, its features) is processor(...)'s encoding of the same
    prompt (both run processor.encode_prompts); the reply follows the prompt and alone carries labels."""
    oracle = load_oracle("train_b2")
    conversation = _spoken_conversation(1, oracle)
    example = processor.build_training_example(conversation)
    prompt = conversation[:-1]
    text = processor.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False, speech_output=True)
    inputs = processor(
        text=text,
        audio=processor.audios_in_conversation(prompt),
        sampling_rate=16000,
        audio_kwargs={"padding": "longest"},
        return_tensors="np",
    )
    length = inputs["input_ids"].shape[1]
    assert example["input_ids"][:length] == inputs["input_ids"][0].tolist()
    assert example["labels"][:length] == [-100] * length and -100 not in example["labels"][length:]
    frames = int(inputs["speech_attention_mask"][0].sum())
    assert example["speech_ids"][0] == inputs["speech_ids"][0, :frames].tolist()
    valid = int(inputs["feature_attention_mask"][0].sum())
    np.testing.assert_array_equal(example["input_features"][0], inputs["input_features"][0, :, :valid])
    assert example["feature_exist_mask"][0] == bool(inputs["feature_exist_mask"][0])


def test_default_system_prompt_follows_reply_modality(processor):
    spoken = processor.build_training_example(
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "audio", "speech_codes": [1, 2, 3]}]},
        ]
    )
    texty = processor.build_training_example(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    )
    assert processor.decode(spoken["input_ids"]).startswith(f"<|im_start|>system\n{DEFAULT_S2M_PROMPT}<|im_end|>")
    assert processor.decode(texty["input_ids"]).startswith(f"<|im_start|>system\n{DEFAULT_S2T_PROMPT}<|im_end|>")
    # text reply: labels on "hello<|im_end|>\n" only, no audio rows
    labelled = [i for i, lab in zip(texty["input_ids"], texty["labels"]) if lab != -100]
    assert processor.decode(labelled) == "hello<|im_end|>\n"
    assert texty["speech_ids"] == [] and texty["input_features"] == []
    # spoken reply without user audio: one row (the reply), 3 codes + 10 delay -> 3 groups
    assert spoken["speech_ids"] == [[296] * 10 + [1, 2, 3]]
    assert processor.decode([i for i, lab in zip(spoken["input_ids"], spoken["labels"]) if lab != -100]) == (
        "<|audio_bos|>" + "<|AUDIO|>" * 3 + "<|audio_eos|><|im_end|>\n"
    )


def test_text_only_batch_and_mixed_batch(processor):
    collator = FunAudioChatDataCollator(processor)
    texty = processor.build_training_example(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    )
    only_text = collator([texty, texty])
    assert set(only_text) == {"input_ids", "attention_mask", "labels"}
    oracle = load_oracle("train_b2")
    spoken = processor.build_training_example(_spoken_conversation(0, oracle))
    mixed = collator([texty, spoken])
    assert mixed["speech_ids"].shape[0] == 2 and mixed["input_features"].shape[0] == 1
    assert mixed["attention_mask"][0].sum() == len(texty["input_ids"])
    assert (mixed["labels"][0, len(texty["input_ids"]) :] == -100).all()


def test_left_padding_option(processor):
    texty = processor.build_training_example(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    )
    longer = processor.build_training_example(
        [{"role": "user", "content": "hi there you"}, {"role": "assistant", "content": "hello"}]
    )
    batch = FunAudioChatDataCollator(processor, padding_side="left", pad_to_multiple_of=8)([texty, longer])
    assert batch["input_ids"].shape[1] % 8 == 0
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1


def test_example_errors(processor):
    with pytest.raises(ValueError, match="last message is the assistant reply"):
        processor.build_training_example([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="pass speech_tokenizer="):
        processor.build_training_example(
            [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [{"type": "audio", "audio": noise(16000), "sampling_rate": 16000}]},
            ]
        )
    with pytest.raises(ValueError, match=r"speech codes must be in \[0, 296\)"):
        processor.build_training_example(
            [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [{"type": "audio", "speech_codes": [5, 296]}]},
            ]
        )
    with pytest.raises(ValueError, match="more than max_length=5"):
        processor.build_training_example(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], max_length=5
        )
    with pytest.raises(ValueError, match="needs 'input_ids' .* or 'messages'"):
        FunAudioChatDataCollator(processor)([{"foo": 1}])


def test_long_transcript_warns(processor):
    with pytest.warns(UserWarning, match="transcript has .* tokens but the reply has only 3 speech groups"):
        processor.build_training_example(
            [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "a much longer transcript than fits"},
                        {"type": "audio", "speech_codes": [1, 2, 3]},
                    ],
                },
            ]
        )


def test_on_the_fly_messages_rows(processor):
    oracle = load_oracle("train_b2")
    conversations = [_spoken_conversation(b, oracle) for b in range(2)]
    built = FunAudioChatDataCollator(processor)([processor.build_training_example(c) for c in conversations])
    on_the_fly = FunAudioChatDataCollator(processor)([{"messages": c} for c in conversations])
    assert built.keys() == on_the_fly.keys()
    for key in built:
        assert torch.equal(built[key], on_the_fly[key]), key


@pytest.mark.slow
def test_datasets_pipeline_map_collate_and_one_trainer_step(processor, tmp_path):
    """Audio column -> Dataset.map(build_training_example) -> collator -> one Trainer step on the tiny model."""
    datasets = pytest.importorskip("datasets")
    from transformers import Trainer, TrainingArguments

    from fun_audio_chat import FunAudioChatForConditionalGeneration
    from fun_audio_chat.tiny import tiny_config

    paths = []
    for i, seconds in enumerate((1.1, 1.7, 0.9, 1.3)):
        path = tmp_path / f"user{i}.wav"
        sf.write(path, noise(int(seconds * 16000), seed=i), 16000, subtype="PCM_16")
        paths.append(str(path))
    rng = np.random.default_rng(0)
    table = {
        "audio": paths,
        "transcript": ["hello there", "good morning", "thank you", "what is the weather"],
        "codes": [rng.integers(0, 296, size=int(n)).tolist() for n in (40, 53, 35, 47)],
    }
    ds = datasets.Dataset.from_dict(table).cast_column("audio", datasets.Audio(decode=False))

    def to_example(row):
        messages = [
            {"role": "user", "content": [{"type": "audio", "audio": row["audio"]}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": row["transcript"]},
                    {"type": "audio", "speech_codes": row["codes"]},
                ],
            },
        ]
        return processor.build_training_example(messages)

    ds = ds.map(to_example, remove_columns=ds.column_names)
    collator = FunAudioChatDataCollator(processor)
    batch = collator([ds[0], ds[1]])
    direct = collator([to_example(dict(zip(table, values))) for values in list(zip(*table.values()))[:2]])
    for key in batch:
        torch.testing.assert_close(batch[key], direct[key], atol=1e-6, rtol=0)

    torch.manual_seed(0)
    model = FunAudioChatForConditionalGeneration(tiny_config())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        max_steps=1,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collator)
    result = trainer.train()
    assert np.isfinite(result.training_loss) and result.training_loss > 0
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert any(n.startswith("language_model") for n in changed)
    assert any("audio_invert_tower" in n for n in changed)  # the speech loss trains the SRH


def test_empty_batch_is_named(processor):
    with pytest.raises(ValueError, match="empty batch"):
        FunAudioChatDataCollator(processor)([])
