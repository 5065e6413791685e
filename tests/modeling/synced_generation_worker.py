"""Worker of the 2-process ``synced_gpus=True`` test (``torchrun --nproc_per_node 2 synced_generation_worker.py OUT``).

Each rank generates one reply with the tiny model, its decoder layers (the LLM's and the Speech Refined Head's)
sharded with FSDP2 over gloo, so every layer's forward gathers its weights from both ranks. Rank 0's reply ends
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


def main():
    out = Path(sys.argv[1])
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

    mesh = init_device_mesh("cpu", (2,))
    for layer in [*model.language_model.model.layers, *model.audio_invert_tower.crq_transformer.layers]:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
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
