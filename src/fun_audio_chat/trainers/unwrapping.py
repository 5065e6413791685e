"""The one way the trainers reach the model inside its training wrappers."""

from __future__ import annotations

from torch import nn


def unwrap_model(model: nn.Module, *, through_peft: bool = True) -> nn.Module:
    """The model inside distributed and compile wrappers (DDP, DataParallel, DeepSpeed, FSDP, ``torch.compile``:
    accelerate's ``extract_model_from_parallel``) and, with ``through_peft``, inside a PEFT model
    (``get_base_model()``: the Fun-Audio-Chat model itself, its adapter layers included)."""
    from accelerate.utils import extract_model_from_parallel, is_peft_model

    model = extract_model_from_parallel(model, keep_torch_compile=False)
    if through_peft and is_peft_model(model):
        model = model.get_base_model()
    return model
