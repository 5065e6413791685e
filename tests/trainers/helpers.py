"""Shared helpers of the trainer tests: tiny models and training examples cut from the oracle's train_b2 batch.

The collator here is a minimal stand-in that only re-pads already tokenised examples; the library's own
collator (``fun_audio_chat.processing``) builds such examples from conversations.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

ORACLE = Path(__file__).resolve().parents[1] / "fixtures" / "oracle"
TEXT_PAD, SPEECH_PAD = 500, 299


def tiny_model(seed: int = 0, **config_overrides):
    from fun_audio_chat import FunAudioChatForConditionalGeneration
    from fun_audio_chat.tiny import tiny_config

    torch.manual_seed(seed)
    return FunAudioChatForConditionalGeneration(tiny_config(**config_overrides)).eval()


def oracle_model():
    from fun_audio_chat import FunAudioChatForConditionalGeneration

    return FunAudioChatForConditionalGeneration.from_pretrained(ORACLE / "model_a").eval()


def oracle_examples() -> list[dict[str, torch.Tensor]]:
    """The two training samples of ``train_b2`` as separate (un-padded) examples."""
    batch = load_file(str(ORACLE / "train_b2" / "inputs.safetensors"))
    examples = []
    for i in range(batch["input_ids"].shape[0]):
        length = int(batch["attention_mask"][i].sum())
        audios = slice(2 * i, 2 * i + 2)
        frames = int(batch["feature_attention_mask"][i].sum())
        speech_len = int(batch["speech_attention_mask"][audios].sum(-1).max())
        examples.append(
            {
                "input_ids": batch["input_ids"][i, :length],
                "attention_mask": batch["attention_mask"][i, :length],
                "labels": batch["labels"][i, :length],
                "input_features": batch["input_features"][i : i + 1, :, :frames],
                "feature_attention_mask": batch["feature_attention_mask"][i : i + 1, :frames],
                "feature_exist_mask": batch["feature_exist_mask"][audios],
                "speech_ids": batch["speech_ids"][audios, :speech_len],
                "speech_attention_mask": batch["speech_attention_mask"][audios, :speech_len],
                "text_ids": batch["text_ids"][audios],
                "text_attention_mask": batch["text_attention_mask"][audios],
            }
        )
    return examples


def _pad_stack(rows, value, dim=-1):
    width = max(r.shape[dim] for r in rows)
    return [torch.nn.functional.pad(r, _pad_spec(r, dim, width), value=value) for r in rows]


def _pad_spec(r, dim, width):
    dim = dim % r.dim()
    spec = []
    for d in reversed(range(r.dim())):
        spec += [0, width - r.shape[d]] if d == dim else [0, 0]
    return spec


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pad token rows, concatenate audio rows (the layout of the model's forward)."""
    out = {
        "input_ids": torch.stack(_pad_stack([e["input_ids"] for e in examples], TEXT_PAD)),
        "attention_mask": torch.stack(_pad_stack([e["attention_mask"] for e in examples], 0)),
        "labels": torch.stack(_pad_stack([e["labels"] for e in examples], -100)),
        "speech_ids": torch.cat(_pad_stack([e["speech_ids"] for e in examples], SPEECH_PAD)),
        "speech_attention_mask": torch.cat(_pad_stack([e["speech_attention_mask"] for e in examples], 0)),
        "text_ids": torch.cat(_pad_stack([e["text_ids"] for e in examples], TEXT_PAD)),
        "text_attention_mask": torch.cat([e["text_attention_mask"] for e in examples]),
        "feature_exist_mask": torch.cat([e["feature_exist_mask"] for e in examples]),
        "input_features": torch.cat(_pad_stack([e["input_features"] for e in examples], 0.0)),
        "feature_attention_mask": torch.cat(_pad_stack([e["feature_attention_mask"] for e in examples], 0)),
    }
    return out


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = list(items)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def train_dataset(repeat: int = 4) -> ListDataset:
    return ListDataset(oracle_examples() * repeat)


def equivalence_dataset() -> ListDataset:
    """4 examples; with 2 processes x batch 1 x accumulation 2 (sequential sampling) process 0 gets items 0 and 2,
    process 1 gets items 1 and 3: different text and speech target counts per process."""
    ex0, ex1 = oracle_examples()
    return ListDataset([ex0, ex0, ex0, ex1])


def base_llm_checkpoint(model, path) -> Path:
    """Save the model's current LLM as a stand-alone Qwen3 causal-LM checkpoint (the Core-Cocktail base M0)."""
    from transformers import Qwen3ForCausalLM

    llm = Qwen3ForCausalLM(model.config.text_config)
    llm.load_state_dict(model.language_model.state_dict())
    llm.save_pretrained(path)
    return Path(path)


def training_args(output_dir, **overrides):
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        max_steps=3,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=0,
        data_seed=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)
