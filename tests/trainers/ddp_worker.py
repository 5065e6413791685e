"""Worker of the 2-process data-parallel test (``torchrun --nproc_per_node 2 ddp_worker.py OUT BASE``).

Each process runs the same SFT and Core-Cocktail code as a single-process run and saves its final weights and
its log history, so the test can check that both ranks end with identical weights.
"""

import json
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from safetensors.torch import save_file  # noqa: E402

from fun_audio_chat.trainers import FunAudioChatTrainer, run_core_cocktail  # noqa: E402
from tests.trainers.helpers import (  # noqa: E402
    collate,
    equivalence_dataset,
    oracle_model,
    train_dataset,
    training_args,
)


def dump(model, path):
    state = {
        k: v.detach().contiguous().clone()
        for k, v in model.state_dict().items()
        if k != "audio_invert_tower.lm_head.weight"
    }
    save_file(state, str(path))


def main():
    out, base = Path(sys.argv[1]), Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    common = dict(per_device_train_batch_size=1, gradient_accumulation_steps=2, logging_steps=1)

    model = oracle_model()
    args = training_args(out / "sft", max_steps=3, **common)
    trainer = FunAudioChatTrainer(model=model, args=args, train_dataset=train_dataset(4), data_collator=collate)
    trainer.train()
    dump(model, out / f"sft_rank{rank}.safetensors")
    world = trainer.args.world_size

    # one SGD step on a fixed global batch whose examples have different target counts on the two ranks:
    # must equal one single-process step on the whole batch (checked by the test)
    model = oracle_model()
    args = training_args(
        out / "equiv",
        max_steps=1,
        optim="sgd",
        learning_rate=0.5,
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
    )
    FunAudioChatTrainer(model=model, args=args, train_dataset=equivalence_dataset(), data_collator=collate).train()
    dump(model, out / f"equiv_rank{rank}.safetensors")

    model = oracle_model()
    stage = dict(
        max_steps=2,
        save_steps=1,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        learning_rate=1e-3,
        min_lr=1e-4,
        **common,
    )
    result = run_core_cocktail(
        model,
        base,
        train_dataset(4),
        out / "cc",
        data_collator=collate,
        stage1_args=stage,
        stage2_args={**stage, "learning_rate": 1e-4, "min_lr": 1e-5},
    )
    dump(model, out / f"cc_rank{rank}.safetensors")
    (out / f"logs_rank{rank}.json").write_text(
        json.dumps(
            {
                "world_size": world,
                "sft": trainer.state.log_history,
                "cc": result.log_history,
            }
        )
    )


if __name__ == "__main__":
    main()
    # Leave the process group before exiting: gloo threads alive at exit can abort a worker ("terminate called
    # without an active exception"), failing the launch after the work is done.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
