"""Helpers of the DPO tests: synthetic preference rows, tiny models, trainers, and an independent log-prob reference.

The independent reference (:func:`independent_stream_log_probs`) rebuilds the text and speech targets of every row
from the batch layout alone (reply span, transcript, reply codes) and sums log-softmax of the model's ``forward``
outputs at those targets; it uses neither ``sequence_log_probs`` nor the model's label builders.
"""

from __future__ import annotations

import numpy as np
import torch

from fun_audio_chat.tiny import TINY_TEXT_SPECIAL_IDS

AUDIO = TINY_TEXT_SPECIAL_IDS["<|AUDIO|>"]
AUDIO_EOS = TINY_TEXT_SPECIAL_IDS["<|audio_eos|>"]
SIL = TINY_TEXT_SPECIAL_IDS["<|sil|>"]
TEXT_PAD = TINY_TEXT_SPECIAL_IDS["<|endoftext|>"]
SPEECH_EOS, SPEECH_PAD, GROUP = 297, 299, 5

GOOD_LETTERS, BAD_LETTERS = "abcdefg", "tuvwxyz"  # chosen / rejected words of the synthetic preference
GOOD_CODES, BAD_CODES = (0, 100), (150, 250)  # chosen / rejected speech-code ranges


def noise(num_samples: int, seed: int = 0, scale: float = 0.1) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(num_samples) * scale).astype(np.float32)


def spoken(text: str, codes) -> list[dict]:
    content = [{"type": "text", "text": text}, {"type": "audio", "speech_codes": [int(c) for c in codes]}]
    return [{"role": "assistant", "content": content}]


def text_answer(text: str) -> list[dict]:
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def user(text: str, audio: np.ndarray | None = None) -> list[dict]:
    content = []
    if audio is not None:
        content.append({"type": "audio", "audio": audio, "sampling_rate": 16000})
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def pair_row(prompt, chosen, rejected, task=None) -> dict:
    row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if task is not None:
        row["task"] = task
    return row


def _word(rng, letters, length=4):
    return "".join(rng.choice(list(letters), size=length))


def _codes(rng, bounds, n):
    return rng.integers(bounds[0], bounds[1], size=n).tolist()


def synthetic_rows(n_per_kind: int, seed: int, n_codes: int = 15) -> list[dict]:
    """Pairs whose chosen/rejected differ in text only ("text"), in speech only ("speech"), or in both ("both").

    Chosen text uses the letters ``a-g`` and chosen speech codes lie in [0, 100); rejected text uses ``t-z`` and
    rejected codes lie in [150, 250). The kind is the row's task.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_per_kind):
        for kind in ("text", "speech", "both"):
            prompt = user(f"q {_word(rng, 'hijklmnopqrs', 3)}")
            shared_text = _word(rng, "hijklmnopqrs")
            shared_codes = _codes(rng, (0, 296), n_codes)
            good_text = _word(rng, GOOD_LETTERS) if kind != "speech" else shared_text
            bad_text = _word(rng, BAD_LETTERS) if kind != "speech" else shared_text
            good_codes = _codes(rng, GOOD_CODES, n_codes) if kind != "text" else shared_codes
            bad_codes = _codes(rng, BAD_CODES, n_codes) if kind != "text" else shared_codes
            rows.append(pair_row(prompt, spoken(good_text, good_codes), spoken(bad_text, bad_codes), task=kind))
    return rows


def permute_within_groups(codes: list[int], delay: int = 10, group: int = GROUP) -> list[int]:
    """Reverse the order of the codes inside every full 5-code group of the speech row (delay codes included).

    A group's LLM input is the mean of its code embeddings, so the text stream's inputs stay the same while the
    SRH's 25 Hz targets change.
    """
    row = [None] * delay + list(codes)
    out = list(row)
    for start in range(0, len(row) - len(row) % group, group):
        out[start : start + group] = row[start : start + group][::-1]
    if any(c is None for c in out[delay:]):
        raise ValueError("choose a code count so that the delay codes stay in their own groups")
    return out[delay:]


def tiny_model(seed: int = 0):
    from fun_audio_chat import FunAudioChatForConditionalGeneration
    from fun_audio_chat.tiny import tiny_config

    torch.manual_seed(seed)
    return FunAudioChatForConditionalGeneration(tiny_config())


def perturbed_copy(model, scale: float = 0.05, seed: int = 1, prefix: str = ""):
    """A deep copy of ``model`` with Gaussian noise added to the parameters whose name starts with ``prefix``."""
    import copy

    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if name.startswith(prefix):
                p.add_(scale * torch.randn(p.shape, generator=generator))
    return other


def dpo_config(output_dir, **overrides):
    from transformers import TrainingArguments

    from fun_audio_chat.trainers.dpo import FunAudioChatDPOConfig

    kwargs = dict(
        output_dir=str(output_dir),
        bf16=False,
        use_cpu=True,
        report_to="none",
        max_steps=2,
        per_device_train_batch_size=3,
        per_device_eval_batch_size=6,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        activation_checkpointing=False,  # TRL turns checkpointing on by default (old name: gradient_checkpointing)
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        data_seed=0,
        beta=0.1,
    )
    kwargs.update(overrides)
    if "activation_checkpointing" not in TrainingArguments.__dataclass_fields__:  # older transformers 5.x
        kwargs["gradient_checkpointing"] = kwargs.pop("activation_checkpointing")
    return FunAudioChatDPOConfig(**kwargs)


def make_trainer(model, rows, processor, output_dir, ref_model=None, eval_rows=None, peft_config=None, **config):
    from datasets import Dataset

    from fun_audio_chat.trainers.dpo import FunAudioChatDPOTrainer

    return FunAudioChatDPOTrainer(
        model,
        ref_model=ref_model,
        args=dpo_config(output_dir, **config),
        train_dataset=Dataset.from_list(rows),
        eval_dataset=None if eval_rows is None else Dataset.from_list(eval_rows),
        processing_class=processor,
        peft_config=peft_config,
    )


# ------------------------------------------------------------------------------------- independent log-probs
def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of the runs of True in a 1-D bool tensor."""
    runs, start = [], None
    for i, value in enumerate(mask.tolist() + [False]):
        if value and start is None:
            start = i
        elif not value and start is not None:
            runs.append((start, i))
            start = None
    return runs


def independent_stream_log_probs(model, batch) -> dict[str, torch.Tensor]:
    """Per-row summed text and speech log-probs of the labelled reply, from ``model(**batch).logits/.speech_logits``.

    Targets, rebuilt here from the layout (docs/official-format.md#training-forward): the text stream predicts, from each position, the next token of
    the reply where every ``<|AUDIO|>`` slot j of the reply stands for transcript token j (``<|sil|>`` past the
    transcript's end); the speech stream predicts, from sub-position (p, k), the k-th code of the group placed at
    position p+1 (the reply's 25 Hz row cut in groups of 5; the last group's pad tail is the speech pad id, or unscored
    under the official training recipe) or speech-EOS when position p+1 is ``<|audio_eos|>``.
    """
    out = model(**batch)
    score_pad_tail = not model.config.uses_official_training_recipe
    text_lp = torch.log_softmax(out.logits.double(), -1)
    speech_lp = torch.log_softmax(out.speech_logits.double(), -1)
    input_ids, labels = batch["input_ids"], batch["labels"]
    speech_ids, speech_mask = batch["speech_ids"], batch["speech_attention_mask"]
    text_ids, text_mask = batch["text_ids"], batch["text_attention_mask"]
    rows, length = input_ids.shape
    text_sums, speech_sums = torch.zeros(rows, dtype=torch.float64), torch.zeros(rows, dtype=torch.float64)
    audio_row = 0
    for r in range(rows):
        spans = _runs(input_ids[r] == AUDIO)
        reply_row, reply_span = None, None
        for start, end in spans:
            if labels[r, start] != -100:
                reply_row, reply_span = audio_row, (start, end)
            audio_row += 1
        # text targets: labels, with the reply's AUDIO slots replaced by the 5 Hz transcript
        targets = labels[r].clone()
        speech_targets = torch.full((length, GROUP), -100, dtype=torch.long)
        if reply_span is not None:
            start, end = reply_span
            transcript = [t for t in text_ids[reply_row].tolist() if t != TEXT_PAD] if text_mask[reply_row] else []
            codes = speech_ids[reply_row, : int(speech_mask[reply_row].sum())].tolist()
            for j in range(end - start):
                targets[start + j] = transcript[j] if j < len(transcript) else SIL
                for k in range(GROUP):
                    if j * GROUP + k < len(codes):
                        speech_targets[start + j, k] = codes[j * GROUP + k]
                    elif score_pad_tail:  # the last group's pad tail (the default "consistent" recipe scores it)
                        speech_targets[start + j, k] = SPEECH_PAD
            assert input_ids[r, end] == AUDIO_EOS
            speech_targets[end, :] = SPEECH_EOS
        for p in range(length - 1):
            target = int(targets[p + 1])
            if target != -100:
                text_sums[r] += text_lp[r, p, target]
            for k in range(GROUP):
                code = int(speech_targets[p + 1, k])
                if code != -100:
                    speech_sums[r] += speech_lp[r, p * GROUP + k, code]
    return {"text": text_sums, "speech": speech_sums}
