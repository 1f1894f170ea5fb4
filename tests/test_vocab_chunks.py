"""Vocabulary-chunked embedding and LM head (trainer.models.vocab_chunks) against the unchunked model: same logits,
loss, gradients and LoRA adapter, tied and untied, with a vocabulary the blocks do not divide. The ZeRO-3
partitioned path runs in tests/test_llm_stages.py (2 ranks, losses equal to the 1-process run)."""
import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

from trainer.models.llm import load_llm, tiny_llama_config
from trainer.models.vocab_chunks import ChunkedVocab, chunk_sizes, chunk_vocab

CHUNKS = 7  # 49,152 = 7 x 7,021 + 5: blocks of two sizes


@pytest.fixture(scope="module")
def tied():
    return load_llm("tiny-random")[1]


@pytest.fixture(scope="module")
def untied(tied):
    from transformers import AutoModelForCausalLM

    cfg = tiny_llama_config(tied.config.vocab_size)
    cfg.tie_word_embeddings = False
    torch.manual_seed(1)
    lm = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    assert lm.get_output_embeddings().weight is not lm.get_input_embeddings().weight
    return lm


def _pair(lm, lora: bool):
    """(reference, chunked) copies of `lm`, both with the same random LoRA (B not zero) when asked."""
    ref, ch = copy.deepcopy(lm), chunk_vocab(copy.deepcopy(lm).requires_grad_(False), CHUNKS)
    if not lora:
        return ref, ch
    out = []
    for m in (ref.requires_grad_(False), ch):
        torch.manual_seed(0)
        out.append(get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                                                task_type="CAUSAL_LM")))
    return out


def _ids(vocab, sizes):
    """Every block's first and last row plus random ids, as a [2, L] batch."""
    edges = torch.tensor(sizes).cumsum(0)
    ids = torch.cat([edges - torch.tensor(sizes), edges - 1, torch.randint(0, vocab, (2 * len(sizes) + 2,),
                                                                          generator=torch.Generator().manual_seed(0))])
    return ids.view(2, -1)


@pytest.mark.parametrize("which", ["tied", "untied"])
def test_chunked_model_equals_unchunked(which, request):
    lm = request.getfixturevalue(which)
    vocab, sizes = lm.config.vocab_size, chunk_sizes(lm.config.vocab_size, CHUNKS)
    assert len(set(sizes)) == 2 and sum(sizes) == vocab
    ref, ch = _pair(lm, lora=True)
    emb, head = ch.get_input_embeddings(), ch.get_output_embeddings()
    assert isinstance(emb, ChunkedVocab) and isinstance(head, ChunkedVocab) and emb.lookup and not head.lookup
    # tied: one set of blocks serves both; untied: two; the vocabulary matrices are gone, nothing else changed
    assert (head.chunks is emb.chunks) == (which == "tied")
    assert sum(p.numel() for p in ch.parameters()) == sum(p.numel() for p in ref.parameters())
    assert not any(p.shape[0] == vocab for p in ch.parameters())
    assert all(not p.requires_grad for p in emb.parameters()) and all(not p.requires_grad for p in head.parameters())
    # LoRA "all-linear" targets the same layers: same adapter keys and values, nothing on the blocks
    a, b = get_peft_model_state_dict(ref), get_peft_model_state_dict(ch)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any("chunks" in n or "lm_head" in n or "embed" in n for n in ch.targeted_module_names)

    ids = _ids(vocab, sizes)
    assert torch.equal(emb(ids), ref.get_input_embeddings()(ids))  # a lookup copies rows: exactly equal
    out_r, out_c = ref(input_ids=ids, labels=ids), ch(input_ids=ids, labels=ids)
    assert (out_r.logits - out_c.logits).abs().max() <= 1e-5 and abs(out_r.loss - out_c.loss) <= 1e-5
    out_r.loss.backward()
    out_c.loss.backward()
    grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert grads and all((grads[n] - p.grad).abs().max() <= 1e-5 for n, p in ch.named_parameters() if p.requires_grad)
    # the head's input gradient (what the LoRA layers below it receive)
    h = torch.randn(3, 5, lm.config.hidden_size)
    h1, h2 = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
    g = torch.randn(3, 5, vocab)
    (ref.get_output_embeddings()(h1) * g).sum().backward()
    (head(h2) * g).sum().backward()
    assert (h1.grad - h2.grad).abs().max() <= 1e-5 and h1.grad.abs().max() > 0


def test_bad_chunks_and_ids_fail(tied):
    with pytest.raises(ValueError, match="vocab chunks"):
        chunk_vocab(copy.deepcopy(tied), tied.config.vocab_size + 1)
    with pytest.raises(ValueError, match="vocab chunks"):
        chunk_vocab(copy.deepcopy(tied), 0)
    ch = chunk_vocab(copy.deepcopy(tied), CHUNKS)
    with pytest.raises(ValueError, match="already chunked"):
        chunk_vocab(ch, CHUNKS)
    with pytest.raises(IndexError):  # as nn.Embedding: an unknown id is an error, not a zero vector
        ch.get_input_embeddings()(torch.tensor([[1, tied.config.vocab_size]]))
    assert chunk_sizes(10, 10) == [1] * 10 and chunk_sizes(10, 3) == [4, 3, 3]


def test_build_model_applies_the_setting_before_lora(tmp_path):
    from trainer.config import ConfigError
    from trainer.models.llm import load_tokenizer
    from trainer.stages.multimodal import Config, LLMSettings, LoraSettings, build_model, flops_per_token

    tok = load_tokenizer("tiny-random")
    models = []
    for k in (0, CHUNKS):
        cfg = Config(llm=LLMSettings(name="tiny-random", vocab_chunks=k), lora=LoraSettings(r=4))
        models.append(build_model(cfg, str(tmp_path), "lora", tok, seed=0)[0])
    plain, chunked = models
    assert isinstance(chunked.lm_head, ChunkedVocab) and not isinstance(plain.lm_head, ChunkedVocab)
    assert get_peft_model_state_dict(plain.llm).keys() == get_peft_model_state_dict(chunked.llm).keys()
    assert flops_per_token(chunked, 100.0, 0.3) == flops_per_token(plain, 100.0, 0.3)
    with torch.no_grad():  # the stand-in graph (no molecule) is placed on the head's device
        assert chunked.graph_tokens(None, 0)[0].shape[0] == 0
    big = Config(llm=LLMSettings(name="tiny-random", vocab_chunks=plain.llm.config.vocab_size + 1))
    with pytest.raises(ConfigError, match=r"lora\.llm\.vocab_chunks"):
        build_model(big, str(tmp_path), "lora", tok, seed=0)
