"""Worker of the 2-process ``synced_gpus=True`` test
(``torchrun --nproc_per_node 2 synced_generation_worker.py OUT ENGINE``, ENGINE ``fsdp2`` or ``zero3``).

Each rank generates one reply with the tiny model, sharded over gloo so that every layer's forward gathers its
weights from both ranks: with ``fsdp2`` the decoder layers (the LLM's and the Speech Refined Head's) are sharded by
``fully_shard``; with ``zero3`` every parameter is partitioned by DeepSpeed ZeRO-3 (inference, no optimizer), as
transformers' ZeRO-3 generation runs. Rank 0's reply ends
early (its end token is the third token of its solo reply), so for the rest of the call it only keeps the others
company. Each rank writes its synced result and its solo (unsharded, unsynced) result.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.modeling.model_tester import FunAudioChatModelTester  # noqa: E402

STEPS = 8


def shard_with_fsdp2(model):
    mesh = init_device_mesh("cpu", (2,))
    for layer in [*model.language_model.model.layers, *model.audio_invert_tower.crq_transformer.layers]:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    return model


def shard_with_zero3(model):
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": 1,
        # a tiny model: partition every parameter, or small ones stay whole on each rank and nothing is gathered
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    partitioned = [p for p in engine.module.parameters() if getattr(p, "ds_status", None) is not None]
    assert partitioned and all(p.numel() == 0 for p in partitioned), "ZeRO-3 did not partition the parameters"
    return engine.module


def main():
    out, engine = Path(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tester = FunAudioChatModelTester()
    config, inputs = tester.prepare_config_and_inputs()
    model = tester.create_model(config)
    row = {name: value[rank : rank + 1] for name, value in inputs.items()}
    controls = {
        "do_sample": False,
        "speech_do_sample": False,
        "speech_repetition_penalty": 1.0,
        "pad_token_id": 500,
        "max_new_tokens": STEPS,
        "force_audio_bos": True,
        "return_dict_in_generate": True,
    }
    with torch.no_grad():
        probe = model.generate(**row, **controls, eos_token_id=511)
    new_tokens = probe.sequences[0, row["input_ids"].shape[1] :].tolist()
    # rank 0 stops at its third token (if it appeared before, at its first occurrence); rank 1 runs all its steps
    eos = new_tokens[2] if rank == 0 else 511
    with torch.no_grad():
        solo = model.generate(**row, **controls, eos_token_id=eos)

    model = shard_with_fsdp2(model) if engine == "fsdp2" else shard_with_zero3(model)
    with torch.no_grad():
        synced = model.generate(**row, **controls, eos_token_id=eos, synced_gpus=True)
    torch.save(
        {
            "solo_sequences": solo.sequences,
            "solo_speech": solo.speech_ids,
            "synced_sequences": synced.sequences,
            "synced_speech": synced.speech_ids,
            "new_tokens": solo.sequences.shape[1] - row["input_ids"].shape[1],
        },
        out / f"rank{rank}.pt",
    )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
