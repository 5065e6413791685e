"""Two-process DDP runs of FunAudioChatDPOTrainer (launched by test_dpo.py under torchrun).

Usage: ``torchrun --standalone --nproc_per_node 2 dpo_ddp_script.py OUTPUT_DIR``. In the same two processes it runs

* ``lora``: a LoRA adapter on the LLM's q/v projections (``fun_audio_chat_lora_config``), reference = adapter off;
* ``full``: full fine-tuning against an explicit frozen reference copy;
* ``precompute``: full fine-tuning with ``precompute_ref_log_probs=True`` (reference log-probs computed on both
  processes' shards and gathered).

Every rank writes ``OUTPUT_DIR/rank<k>.json``: per run its world size, the wrapper type, the log history and a
checksum of the trainable parameters after training (equal on both ranks when the gradients were all-reduced); for
``precompute`` also the largest difference between the stored reference log-probs and a local recomputation.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dpo_helpers import make_trainer, synthetic_rows, tiny_model  # noqa: E402


def _record(trainer) -> dict:
    trainable = [p.detach().double() for p in trainer.model.parameters() if p.requires_grad]
    return {
        "world_size": trainer.args.world_size,
        "wrapper": type(trainer.model_wrapped).__name__,
        "checksum": float(sum((p * p).sum() for p in trainable)),
        "num_trainable": sum(p.numel() for p in trainable),
        "log_history": trainer.state.log_history,
    }


def main(output_dir: str) -> None:
    from fun_audio_chat.tiny import tiny_processor
    from fun_audio_chat.trainers.lora import fun_audio_chat_lora_config

    torch.set_num_threads(1)
    processor = tiny_processor()
    rows = synthetic_rows(2, seed=0)  # 6 pairs: 3 per process at batch size 1 x 3 steps
    common = dict(max_steps=3, per_device_train_batch_size=1, learning_rate=1e-2)
    records = {}

    lora = fun_audio_chat_lora_config("llm", r=4, projections=("q", "v"), lora_dropout=0.0)
    trainer = make_trainer(tiny_model(0), rows, processor, os.path.join(output_dir, "lora"), peft_config=lora, **common)
    trainer.train()
    records["lora"] = _record(trainer)
    records["lora"]["lora_b_norm"] = float(
        sum(p.detach().abs().sum() for n, p in trainer.model.named_parameters() if "lora_B" in n)
    )

    model = tiny_model(0)
    reference = copy.deepcopy(model)
    trainer = make_trainer(model, rows, processor, os.path.join(output_dir, "full"), ref_model=reference, **common)
    trainer.train()
    records["full"] = _record(trainer)
    records["full"]["reference_unchanged"] = all(
        torch.equal(a, b) for a, b in zip(reference.state_dict().values(), tiny_model(0).state_dict().values())
    )

    trainer = make_trainer(
        tiny_model(0),
        rows,
        processor,
        os.path.join(output_dir, "pre"),
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=2,
        **common,
    )
    dataset = trainer.train_dataset
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        local = tiny_model(0).eval().sequence_log_probs(**batch)
    stored = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
    expected = torch.stack([local["text"], local["speech"]], dim=-1)
    trainer.train()
    records["precompute"] = _record(trainer)
    records["precompute"]["ref_max_diff"] = float((stored - expected).abs().max())
    records["precompute"]["num_pairs"] = len(dataset)

    rank = trainer.args.process_index
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as f:
        json.dump(records, f)
    # Leave the process group before the interpreter exits: a worker whose gloo threads are still alive at exit can
    # die with "terminate called without an active exception" (seen once in a full run), failing the launch.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
