"""Which stream learns a text-only preference: the share of the DPO reward margin carried by the speech term.

Text-preference pairs are spoken answers with the same 25 Hz codes and different transcripts. The speech log-prob
still differs between them, because the Speech Refined Head is conditioned on the transcript's embedding at every
5 Hz step (docs/dpo.md, "What each stream's log-prob carries"). This script trains the tiny built-in model with
``FunAudioChatDPOTrainer`` on such pairs, once with the default ``speech_logp_weight=1`` and once with the task's
speech weight at 0 (``task_speech_logp_weights={"text_preference": 0.0}``), and prints, from the logged metrics of
the last steps, the reward margin and its two terms (``rewards/text_margins`` + ``rewards/speech_margins``) and the
share of the margin that the speech term carries.

Random tiny weights, CPU, fp32, deterministic (seeded). Usage:
python benchmarks/bench_dpo_streams.py [--pairs 12] [--steps 30] [--beta 0.1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile

import numpy as np
import torch
from datasets import Dataset
from transformers import PrinterCallback

from fun_audio_chat.tiny import tiny_model_and_processor
from fun_audio_chat.trainers import FunAudioChatDPOConfig, FunAudioChatDPOTrainer

CHOSEN_LETTERS, REJECTED_LETTERS = "abcdefg", "tuvwxyz"


def spoken_answer(text: str, codes: list[int]) -> list[dict]:
    content = [{"type": "text", "text": text}, {"type": "audio", "speech_codes": codes}]
    return [{"role": "assistant", "content": content}]


def text_preference_pairs(count: int, seed: int = 0) -> list[dict]:
    """Pairs whose answers share their speech codes and differ in their transcripts only."""
    rng = np.random.default_rng(seed)

    def word(letters: str) -> str:
        return "".join(rng.choice(list(letters), size=4))

    rows = []
    for _ in range(count):
        codes = rng.integers(0, 296, size=15).tolist()
        rows.append(
            {
                "prompt": [{"role": "user", "content": [{"type": "text", "text": f"q {word('hijklmnop')}"}]}],
                "chosen": spoken_answer(word(CHOSEN_LETTERS), codes),
                "rejected": spoken_answer(word(REJECTED_LETTERS), codes),
                "task": "text_preference",
            }
        )
    return rows


def train(rows: list[dict], steps: int, beta: float, task_weights: dict[str, float] | None) -> dict[str, float]:
    """Train a fresh tiny model; the medians over the last quarter of the logged steps of the margin metrics."""
    model, processor = tiny_model_and_processor(seed=0)
    model.train()
    reference = copy.deepcopy(model).eval()
    with tempfile.TemporaryDirectory() as output_dir:
        args = FunAudioChatDPOConfig(
            output_dir=output_dir,
            use_cpu=True,
            report_to="none",
            max_steps=steps,
            per_device_train_batch_size=4,
            learning_rate=1e-3,
            logging_steps=1,
            save_strategy="no",
            disable_tqdm=True,
            seed=0,
            data_seed=0,
            beta=beta,
            task_speech_logp_weights=task_weights,
        )
        trainer = FunAudioChatDPOTrainer(
            model,
            ref_model=reference,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=processor,
        )
        trainer.remove_callback(PrinterCallback)  # the per-step log dicts; the summary is printed below
        trainer.train()
    logged = [entry for entry in trainer.state.log_history if "rewards/margins" in entry]
    tail = logged[-max(1, len(logged) // 4) :]
    names = ("rewards/margins", "rewards/text_margins", "rewards/speech_margins", "rewards/accuracies")
    return {name: statistics.median(entry[name] for entry in tail) for name in names}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    rows = text_preference_pairs(options.pairs)
    print(
        f"{options.pairs} text-preference pairs (same 15 codes, different 4-letter transcripts), {options.steps} steps"
    )
    for label, weights in (("speech weight 1 (default)", None), ("task speech weight 0", {"text_preference": 0.0})):
        result = train(rows, options.steps, options.beta, weights)
        margin, speech = result["rewards/margins"], result["rewards/speech_margins"]
        share = speech / margin if margin else float("nan")
        print(
            f"{label:26s} margin {margin:8.3f} = text {result['rewards/text_margins']:8.3f} + speech {speech:8.3f}"
            f" | speech share {share:6.1%} | accuracy {result['rewards/accuracies']:.2f}"
        )


if __name__ == "__main__":
    main()
