"""LoRA adapters (PEFT) on the LLM, partitioned from creation under ZeRO-3.

    lm = add_lora(lm, r=16, alpha=32, dropout=0.05, target_modules="all-linear")   # a PeftModel

`get_peft_model` creates every adapter whole on every rank; DeepSpeed partitions them only at
`accelerator.prepare`. For LLaMA-70B with r 64 on every linear layer that is 828M parameters (3.3 GB in
fp32) on each rank next to its slice of the base model. When the LLM was built partitioned
(`trainer.models.llm.load_llm` under ZeRO-3), `add_lora` creates the adapters inside `deepspeed.zero.Init`:
each adapter matrix is initialised on rank 0, broadcast and partitioned as soon as it exists, so a rank
holds one adapter matrix whole at a time.

Initialisation is the same on both paths: A keeps `nn.Linear`'s default (kaiming-uniform with a = sqrt(5),
PEFT's own A init, drawn once instead of twice), B is zero, so the adapted model starts equal to the base
one and a ZeRO-3 run starts from the same adapters as a one-process run with the same seed.
"""
from __future__ import annotations

import torch

from .zero3 import is_zero3_param


def add_lora(lm, r: int, alpha: float, dropout: float = 0.0, target_modules="all-linear", task_type=None):
    """`lm` wrapped in a PEFT LoRA model (a PeftModel; the adapter folder it saves loads with
    `PeftModel.from_pretrained`). Partitioned from creation when `lm` is ZeRO-3 partitioned."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    # init_lora_weights=False: PEFT re-draws A and zeroes B after nn.Linear initialised both; a partitioned
    # matrix has no whole tensor to re-draw, so A keeps nn.Linear's draw (same distribution) on both paths
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        task_type=task_type, init_lora_weights=False)
    if any(is_zero3_param(p) for p in lm.parameters()):
        from .llm import zero_init

        # the LLM's dtype (zero.Init's own choice where it ignores dtype: the DeepSpeed config's precision);
        # no fp32 up-cast of the adapters: it would change each parameter's empty tensor, not its partition
        with zero_init(lm.dtype, init_weights=True):
            model = get_peft_model(lm, config, autocast_adapter_dtype=False)
    else:
        model = get_peft_model(lm, config)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLayer):
                for b in m.lora_B.values():
                    for p in b.parameters():
                        (p.ds_tensor if hasattr(p, "ds_tensor") else p).zero_()
    return model
