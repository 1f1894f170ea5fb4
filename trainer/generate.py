"""Greedy generation with graph tokens: prompts embedded once (one encoder call per batch), then decoded.

    tok, model, meta = trainer.export.load_export("runs/demo/train/lora/export")
    texts = generate(model, tok, [dataset[i] for i in range(8)], max_new_tokens=128)

Prompts are left-padded so every row's last prompt token sits at the same position; generation runs on
plain SDPA (the packed-training `sdpa_varlen` kernel needs sample boundaries, which a cache does not).
"""
from __future__ import annotations

import torch


@torch.no_grad()
def generate(model, tok, items: list[dict], max_new_tokens: int = 128, num_beams: int = 1) -> list[str]:
    """Decoded answers for dataset items (trainer.instructions), in order; the answer part is ignored."""
    from torch_geometric.data import Batch

    base = model._base()
    if base.config._attn_implementation != "sdpa":
        base.set_attn_implementation("sdpa")
    model.eval()
    prompts = [torch.as_tensor(it["input_ids"][: it["num_prompt"]]) for it in items]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(items), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    graphs = [g for it in items for g in it["graphs"]]
    batch = Batch.from_data_list(graphs) if graphs else None
    embeds = model.embed(ids, batch, len(graphs))
    out = model.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=num_beams, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, use_cache=True)  # training loads set use_cache=False
    return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]
