"""
model.py: the Qwen2 / Qwen2.5 decoder in plain PyTorch, its Hugging Face checkpoint format, and a KV-cached sampler.

Qwen2 (Yang et al. 2024, arXiv 2407.10671) is a pre-norm decoder: RMSNorm (in fp32), grouped-query attention with
biases on q/k/v (none on o_proj), rotate-half RoPE, a SwiGLU MLP, and an LM head untied on 7B (tied on 0.5B-3B).
Parameter names are Hugging Face's, so checkpoints load verbatim. Training scores tokens with
`model(tokens, logits_at=..., targets=...)` (token_logps: no [n, V] logits held) and may add LoRA adapters.

    model = load("Qwen2.5-7B-Instruct", dtype=torch.bfloat16, device="cuda")
    out = generate(model, [load_tokenizer("Qwen2.5-7B-Instruct").encode(text).ids], 512, stop_ids=(151645, 151643))
    python model.py --model Qwen2.5-0.5B-Instruct     # sample one reply (no --model: a small random model)
"""
import argparse
import contextlib
import json
import math
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


class UserError(ValueError):
    """Bad input (data, checkpoint, argument, an output in use): templates.run_main prints it as one line and exits
    2; any other exception is a bug and keeps its traceback. Here, in the bottom file, so that every script has it."""


# ----------------------------------------------------------------------------------------------------------------
# Config: the fields of a Hugging Face Qwen2 config.json that change the computation.


@dataclass
class ModelConfig:
    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    max_position_embeddings: int = 32768
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    bos_token_id: int = 151643
    eos_token_id: int = 151645

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def stop_ids(self) -> list:
        """End of turn and end of text, the eos and bos ids: Qwen2.5-Instruct's own generation_config says
        [151645, 151643]; a base model (eos = bos = 151643) or another tokenizer gets its own."""
        return list(dict.fromkeys([self.eos_token_id, self.bos_token_id]))

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """Read a config.json dict. Features we do not implement are errors, not silent differences."""
        if hf.get("model_type") not in (None, "qwen2"):
            raise UserError(f"model_type {hf.get('model_type')!r} is not qwen2 (only Qwen2 / Qwen2.5 checkpoints load)")
        # Qwen releases put rope_theta at the top level; transformers 5 writes rope_parameters {"rope_type":
        # "default", "rope_theta": ...}, and following the Qwen2.5 model card's long-context advice adds
        # rope_scaling {"type": "yarn"} beside it: both keys are checked.
        for key in ("rope_parameters", "rope_scaling"):
            scaling = hf.get(key) or {}
            if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
                raise UserError(f"{key} {scaling} is not supported: only the default rotary embedding (no YaRN or "
                                f"other RoPE scaling); remove it to run at the native context")
        if hf.get("use_sliding_window"):
            raise UserError("use_sliding_window=true is not supported (Qwen2.5 checkpoints ship it false)")
        if hf.get("hidden_act", "silu") != "silu":
            raise UserError(f"hidden_act {hf['hidden_act']!r} is not supported (Qwen2 uses silu)")
        kwargs = {f.name: hf[f.name] for f in fields(cls) if f.name in hf}
        if "rope_theta" in (hf.get("rope_parameters") or {}):
            kwargs["rope_theta"] = hf["rope_parameters"]["rope_theta"]
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        cfg = cls(**kwargs)
        if cfg.hidden_size % cfg.num_attention_heads or cfg.num_attention_heads % cfg.num_key_value_heads:
            raise UserError(f"inconsistent head counts in {cfg}")
        if hf.get("head_dim", cfg.head_dim) != cfg.head_dim:
            raise UserError(f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads = {cfg.head_dim}")
        return cfg

    def to_hf(self, dtype: torch.dtype) -> dict:
        """The config.json that transformers' Qwen2ForCausalLM (and so vLLM) reads back unchanged."""
        dtype = str(dtype).removeprefix("torch.")  # what vLLM's --dtype auto serves
        return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **asdict(self), "head_dim": self.head_dim,
                "hidden_act": "silu", "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
                "use_sliding_window": False, "sliding_window": None, "max_window_layers": self.num_hidden_layers,
                "rope_scaling": None, "torch_dtype": dtype, "dtype": dtype}  # dtype: transformers 5's name


# ----------------------------------------------------------------------------------------------------------------
# The architecture. Module names mirror Hugging Face's (model.layers.0.self_attn.q_proj, ...), so a checkpoint's
# tensor name is "model." + our parameter name (lm_head.weight excepted), with no reshaping or permutation.


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 even under bf16: the mean of squares loses precision otherwise. The product with the
        # weight happens in the input dtype, exactly as Qwen2RMSNorm does, so bf16 logits match transformers'.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(cfg: ModelConfig, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin [B, T, head_dim] for integer positions [B, T]. Computed in fp32 on every forward (a few thousand
    flops): no buffers to materialise after meta-device construction, no precision lost to a bf16 table."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, device=positions.device, dtype=torch.float32) / d))
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout: the two halves share frequencies
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    # x: [B, H, T, D]; Qwen2 rotates the first half against the second half (not interleaved pairs).
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat([-x2, x1], dim=-1) * sin[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, cache=None, start=0, mask=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            # Write this step's keys/values in place into the preallocated cache [B, H_kv, max_len, D] at slots
            # [start, start + T) and attend over the slots written so far. A compiled decode step passes `start` as
            # a tensor of slot ids (no Python number that changes from step to step) and attends over the whole
            # cache, its `mask` hiding the slots not written yet. `mask` hides left padding (and, in prefill, the
            # future).
            k_cache, v_cache = cache
            slots = start if torch.is_tensor(start) else torch.arange(start, start + T, device=x.device)
            k_cache.index_copy_(2, slots, k)
            v_cache.index_copy_(2, slots, v)
            end = None if torch.is_tensor(start) else start + T
            k, v = k_cache[:, :, :end], v_cache[:, :, :end]
        groups = self.n_heads // self.n_kv_heads
        if mask is None or groups == 1:
            # enable_gqa shares each KV head across its query heads without copying (causal, no mask: training,
            # where the fused kernels take it).
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and cache is None,
                                               enable_gqa=groups > 1)
        else:
            # A boolean mask together with enable_gqa sends CUDA's SDPA to the math kernel in some torch versions
            # (k/v repeated per query head, the whole score matrix materialised). Fold each KV head's query heads
            # into the query axis instead: q [B, H_kv, G*T, D] against k/v [B, H_kv, S, D] is plain multi-head
            # attention, which the fused kernels take; the mask repeats over the G groups (a view in decode, T = 1).
            S = k.shape[2]
            q = q.reshape(B, self.n_kv_heads, groups * T, self.head_dim)  # query head h = kv head h // G, group h % G
            mask = mask.expand(B, 1, T, S)[:, :, None].expand(B, 1, groups, T, S).reshape(B, 1, groups * T, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).view(B, self.n_heads, T, self.head_dim)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache=None, start=0, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.activation_checkpointing = False

    def forward(self, tokens, positions=None, cache=None, start=0, mask=None, logits_at=None, targets=None):
        """tokens [B, T] -> logits [B, T, V]; called plainly, the full causal forward of training.

        The sampler passes per-row `positions` (a left-padded prompt starts at 0 after its padding), a KV `cache`
        (one (k, v) pair per layer) written at slots [start, start + T), and a boolean `mask` [B, 1, T, slots]
        (True = attend). A boolean `logits_at` [B, T] gives the logits [n, V] of only the n positions it selects,
        row-major (at vocab 152k a prompt's [B, T, V] logits would be GBs); with `targets` [n] too, the fp32
        log-probs [n] of those targets there (token_logps)."""
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        x = self.embed_tokens(tokens)
        cos, sin = rope_cos_sin(self.config, positions, x.dtype)
        for i, layer in enumerate(self.layers):
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                # Recompute each block in the backward pass: activations drop from O(layers) to O(1) blocks.
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin, None if cache is None else cache[i], start, mask)
        if logits_at is not None:
            x = x[logits_at]
        if targets is not None:
            # Inside forward, so that under FSDP2 the head weight is the gathered parameter and its gradient reaches
            # the real one (with tied embeddings it is the embedding's, and autograd adds both parts).
            return token_logps(self.norm(x), self.lm_head.weight, targets)
        return self.lm_head(self.norm(x))


def init_weights(model: Transformer, std: float = 0.02, seed: int = 0):
    """Random init for models trained from scratch (tests, the miniature). Checkpoints overwrite all of this."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Sequence log-probs: log p(target) at chosen positions without the [n, V] logits. At vocab 152k one DPO pair of
# 2 x 4,096 tokens has 8,192 scored positions: their fp32 logits are 5 GB, and autograd around a plain log-softmax
# holds ~4 such tensors (the fp32 copy, logsumexp's temporary, its gradient, the gather's scatter buffer). Here the
# head, the fp32 log-softmax and the gather run over chunks of positions; only the hidden states, the targets and
# one logsumexp per position are kept, and backward recomputes each chunk's logits (one more head matmul: ~7% of a
# 7B model's flops, a third of that extra). TRL's ChunkedLogProbFunction does the same over vocabulary tiles.

LOGPS_CHUNK = 512  # positions per chunk: 512 x 152,064 fp32 = 0.3 GB, big enough for a full-speed GPU matmul


def token_logps(hidden, head_weight, targets, chunk_size=None):
    """log softmax(hidden @ head_weight.T)[i, targets[i]] in fp32, [n], for hidden [n, H], head_weight [V, H]."""
    return TokenLogps.apply(hidden, head_weight, targets, chunk_size or LOGPS_CHUNK)


class TokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        # The head computes in the autocast dtype if autocast is on (bf16 logits, as nn.Linear would give them), then
        # log-softmax in fp32. Casts are explicit, so that backward recomputes exactly the forward's logits.
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        logps = torch.empty(len(hidden), dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logps)
        with torch.autocast(device, enabled=False):
            w = weight.to(dtype)
            for s in range(0, len(hidden), chunk_size):
                logits = (hidden[s:s + chunk_size].to(dtype) @ w.t()).float()
                logps[s:s + chunk_size] = logits.gather(1, targets[s:s + chunk_size, None]).squeeze(1)
                # logsumexp in place (torch.logsumexp would allocate a second chunk-sized temporary)
                top = logits.amax(-1, keepdim=True)
                lse[s:s + chunk_size] = logits.sub_(top).exp_().sum(-1).log_().add_(top.squeeze(1))
                del logits  # before the next chunk's matmul, or two chunks are alive at once
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.dtype, ctx.chunk_size = dtype, chunk_size
        return logps.sub_(lse)

    @staticmethod
    def backward(ctx, grad):
        # d logp_t / d logits_t = onehot(target_t) - softmax_t, scaled by grad_t, then through the head's matmul.
        hidden, weight, targets, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        dtype, c, device = ctx.dtype, ctx.chunk_size, hidden.device.type
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # Accumulated over chunks in fp32 (one rounding at the end, as one big matmul would have).
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad = grad.float()
        with torch.autocast(device, enabled=False):
            w = weight.to(dtype)
            for s in range(0, len(hidden), c):
                h = hidden[s:s + c].to(dtype)
                g = (h @ w.t()).float().sub_(lse[s:s + c, None]).exp_().mul_(-grad[s:s + c, None])
                g = g.scatter_add_(1, targets[s:s + c, None], grad[s:s + c, None]).to(dtype)
                if need_hidden:
                    grad_hidden[s:s + c] = g @ w
                if need_weight:  # fp32: in place, no [V, H] temporary; bf16: addmm_ needs one dtype
                    if dtype == torch.float32:
                        grad_weight.addmm_(g.t(), h)
                    else:
                        grad_weight += g.t() @ h
                del g
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: the Hugging Face folder layout (config.json + model.safetensors, or shards + an index).

INDEX_FILE = "model.safetensors.index.json"
# A Hugging Face tokenizer's files (the .json is all we read; the rest let transformers load a checkpoint as is).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json")


def hf_name(name: str) -> str:
    return name if name == "lm_head.weight" else "model." + name


def checkpoint_names(model: Transformer) -> dict:
    """{hf tensor name: our parameter}, the full list a checkpoint must hold. A tied model's file omits
    lm_head.weight (it is the embedding), as Hugging Face writes and expects it."""
    params = {n: p for n, p in model.named_parameters(remove_duplicate=False) if ".lora_" not in n}  # adapters: apart
    if model.config.tie_word_embeddings:
        params.pop("lm_head.weight")
    return {hf_name(n): p for n, p in params.items()}


def read_config(path) -> dict:
    """The config.json dict of a checkpoint folder (or of a config.json path), with one-line errors."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not path.exists():
        raise UserError(f"{path}: no such folder (expected a Hugging Face Qwen2 checkpoint folder: config.json, "
                        "*.safetensors)")
    if not file.is_file():
        raise UserError(f"{path}: no config.json (expected a Hugging Face Qwen2 checkpoint folder)")
    try:
        hf = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{file}: not a JSON config ({e}); damaged: save or download it again") from None
    if not isinstance(hf, dict):
        raise UserError(f"{file}: not a JSON object")
    return hf


def _open_safetensors(file, device="cpu"):
    try:
        return safe_open(file, framework="pt", device=str(device))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{file}: unreadable safetensors ({e}); truncated or damaged: save or download it again") \
            from None


def load(path, dtype=torch.float32, device="cpu") -> Transformer:
    """Load a Hugging Face Qwen2 folder. The model is built on the meta device and each tensor is assigned as it
    is read (converted to `dtype` on `device`), so peak memory is one copy of the weights, not two."""
    path = Path(path)
    hf = read_config(path)
    try:
        cfg = ModelConfig.from_hf(hf)
    except UserError as e:
        raise UserError(f"{path / 'config.json'}: {e}") from None
    if (path / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path / INDEX_FILE}: not a safetensors index ({e!r}); save or download it again") \
                from None
    elif (path / "model.safetensors").is_file():
        with _open_safetensors(path / "model.safetensors") as f:
            weight_map = {name: "model.safetensors" for name in f.keys()}
    else:
        raise UserError(f"{path}: neither model.safetensors nor {INDEX_FILE}")

    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {name: tuple(p.shape) for name, p in checkpoint_names(model).items()}
    missing = sorted(set(expected) - set(weight_map))
    unexpected = sorted(set(weight_map) - set(expected) - {"lm_head.weight"})
    if missing:
        raise UserError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}")
    if unexpected:
        raise UserError(f"{path}: unexpected tensors {[(n, weight_map[n]) for n in unexpected[:5]]}")
    state = {}
    for file in sorted(set(weight_map.values())):
        if not (path / file).is_file():
            raise UserError(f"{path / file}: shard named in {INDEX_FILE} is missing")
        with _open_safetensors(path / file, device) as f:
            for name in f.keys():
                if name not in expected:
                    continue  # a tied checkpoint that still stores lm_head.weight: the embedding is used
                shape = tuple(f.get_slice(name).get_shape())
                if shape != expected[name]:
                    raise UserError(f"{path / file}: tensor {name} has shape {shape}, config implies {expected[name]}")
                try:
                    state[name.removeprefix("model.")] = f.get_tensor(name).to(dtype)
                except SafetensorError as e:
                    raise UserError(f"{path / file}: tensor {name} unreadable ({e}); save or download it again") \
                        from None
    absent = sorted(name for name in expected if name.removeprefix("model.") not in state)
    if absent:  # the index promised them, the shard did not hold them
        raise UserError(f"{path}: tensors missing from their shard files: {[(n, weight_map[n]) for n in absent[:5]]}")
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight  # assign=True replaced the Parameter; re-tie
    return model.eval()


def save(model: Transformer, path, state_dict=None, max_shard_bytes: int = 5 * 2**30, dtype=None):
    """Write the Hugging Face layout: config.json, generation_config.json and safetensors in `dtype` (default: the
    parameters'), split into model-0000i-of-0000n.safetensors plus an index when larger than max_shard_bytes.
    Under FSDP pass the gathered full `state_dict` (our parameter names) on rank 0. A LoRA model is saved merged
    (a plain checkpoint; save_adapter writes the adapter)."""
    path, cfg = Path(path), model.config
    path.mkdir(parents=True, exist_ok=True)
    state = state_dict if state_dict is not None else model.state_dict()
    if getattr(model, "lora", None):
        state = merge_lora(state, model.lora)
    tensors = {name: state[name.removeprefix("model.")].detach().to("cpu", dtype).contiguous()
               for name in checkpoint_names(model)}
    dtype = next(iter(tensors.values())).dtype
    (path / "config.json").write_text(json.dumps(cfg.to_hf(dtype), indent=2) + "\n")
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.stop_ids}, indent=2) + "\n")
    shards, size = [{}], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    for old in list(path.glob("model*.safetensors")) + [path / INDEX_FILE]:
        old.unlink(missing_ok=True)  # never leave a stale shard beside a new index
    if len(shards) == 1:
        save_file(shards[0], path / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                              indent=2) + "\n")


def copy_tokenizer(source, dest):
    """Copy the tokenizer files found at `source` (a folder, or a tokenizer.json path) into folder `dest`, so that a
    trained checkpoint is complete on its own."""
    source = Path(source)
    files = [source / name for name in TOKENIZER_FILES] if source.is_dir() else [source]
    for file in files:
        if file.is_file():
            shutil.copyfile(file, Path(dest) / (file.name if source.is_dir() else "tokenizer.json"))


def load_tokenizer(path):
    """The tokenizers-library tokenizer from a checkpoint folder (or a tokenizer.json path)."""
    from tokenizers import Tokenizer
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not path.exists():
        raise UserError(f"{path}: no such folder or file (expected a checkpoint folder with tokenizer.json)")
    if not file.is_file():
        raise UserError(f"{file}: no tokenizer.json")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # the tokenizers library raises a bare Exception for a damaged file
        raise UserError(f"{file}: not a tokenizer.json ({str(e)[:200]})") from None


# ----------------------------------------------------------------------------------------------------------------
# Sampling. Prompts are left-padded to a common length P so that every row writes the same cache slot at each
# step (one in-place write, no gather); each row's RoPE positions start at 0 after its padding, and the mask hides
# the padding slots. With num_samples > 1 each prompt is prefilled once and its cache rows are then repeated.


@torch.inference_mode()
def generate(model: Transformer, prompts, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, stop_ids=(),
             num_samples=1, seed=0, check_every=8, compile=False):
    """New token ids of token-id prompts (of any lengths), len(prompts) * num_samples lists (prompt i's samples at
    [i*num_samples, ...)), each up to and including its first stop id or max_new_tokens long. Every `check_every`
    steps (the loop's only host sync) the loop ends if all rows have stopped, and stopped rows leave the batch once
    they are half of it. Same seed and inputs, same samples. compile=True (or a torch.compile mode) runs
    decode_step compiled; eager (the default) attends over the slots written so far."""
    P, N, device = max(map(len, prompts or [[]])), len(prompts) * num_samples, model.embed_tokens.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    logits, cache, valid, lengths = prefill(model, prompts, P + max_new_tokens)
    if num_samples > 1:  # each prompt was prefilled once; its cache rows are copied once for its samples
        cache = [(k.repeat_interleave(num_samples, 0), v.repeat_interleave(num_samples, 0)) for k, v in cache]
        logits, lengths, valid = (t.repeat_interleave(num_samples, 0) for t in (logits, lengths, valid))
    padded, graphs = not bool(valid.all()), compile == "reduce-overhead"
    if graphs:
        mark_static(cache)
    out = torch.zeros(N, max_new_tokens, dtype=torch.long, device=device)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    rows = torch.arange(N, device=device)  # which output row each live cache row belongs to
    slots = torch.arange(P, P + max_new_tokens, device=device)  # slots[t]: where the token sampled at step t goes
    steps = 0
    for t in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        out[rows, t] = token
        steps = t + 1
        done |= torch.isin(token, stop)
        if t == max_new_tokens - 1:
            break
        if (t + 1) % check_every == 0:
            n_done = int(done.sum())
            if n_done == len(rows):
                break
            if 2 * n_done >= len(rows):
                # Half the rows have stopped (long chains of thought vary a lot in length): drop them from the
                # batch. One copy of the live cache rows, at most log2(N) times per call, between compiled steps.
                live = (~done).nonzero().squeeze(1)
                cache = [(k[live], v[live]) for k, v in cache]
                if graphs:
                    mark_static(cache)
                rows, lengths, token, done, valid = (x[live] for x in (rows, lengths, token, done, valid))
        if compile:
            logits = compiled_decode_step(None if compile is True else compile)(
                model, token, lengths + t, cache, slots[t:t + 1], valid)
        else:
            mask = valid[:, None, None, :P + t + 1] if padded else None
            logits = model(token[:, None], (lengths + t)[:, None], cache, P + t, mask)[:, -1]
    stop_set, results = set(stop_ids), []
    for row in out[:, :steps].tolist():
        end = next((i + 1 for i, tok in enumerate(row) if tok in stop_set), len(row))
        results.append(row[:end])
    return results


def sample_next(logits, temperature, top_k, top_p, generator):
    """One token id per row from logits [N, V]: greedy at temperature 0, else top-k then top-p (nucleus) filtering.
    Sampling uses the exponential race (argmax p / E, E ~ Exp(1)), which draws from p without a host sync."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token once the mass before it is >= top_p.
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return (probs / torch.empty_like(probs).exponential_(generator=generator)).argmax(-1)


def make_cache(cfg: ModelConfig, batch: int, max_len: int, dtype, device):
    shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(cfg.num_hidden_layers)]


def prefill(model: Transformer, prompts, max_len):
    """Run the prompts, left-padded to the longest (P), through the model into a fresh KV cache of max_len slots.
    Returns (next-token logits [B, V], cache, valid [B, max_len]: the slots of real tokens, lengths [B])."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("need at least one prompt, and no empty prompt")
    cfg, device, dtype = model.config, model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    P = int(lengths.max())
    if max_len > cfg.max_position_embeddings:
        raise ValueError(f"longest prompt {P} + new tokens {max_len - P} exceeds the context "
                         f"{cfg.max_position_embeddings}; truncate or drop the prompt first")
    pad = P - lengths
    tokens = torch.zeros(len(prompts), P, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):] = torch.tensor(p, device=device)
    slots = torch.arange(max_len, device=device)
    valid = slots[None, :] >= pad[:, None]
    positions = (slots[None, :P] - pad[:, None]).clamp(min=0)
    # Each query attends causally to real keys; a padding query attends to itself so that no row is all -inf.
    mask = ((slots[:P, None] >= slots[None, :P]) & valid[:, None, :P]) | torch.eye(P, dtype=torch.bool, device=device)
    cache = make_cache(cfg, len(prompts), max_len, dtype, device)
    last = (slots[None, :P] == P - 1).expand(len(prompts), P)  # left padding: every prompt ends in the last column
    return model(tokens, positions, cache, 0, mask[:, None], logits_at=last), cache, valid, lengths


@torch.inference_mode()
def next_token_logits(model: Transformer, prompts):
    """Logits [B, V] of the token after each prompt (scoring without generation, e.g. answer letters)."""
    return prefill(model, prompts, max(map(len, prompts)))[0]


def decode_step(model: Transformer, token, positions, cache, slot, valid):
    """One new token per row -> next-token logits [N, V], every shape fixed for the whole generation: the token is
    written at cache slot `slot` (a 1-element tensor) and attends over all max_len slots, `valid` [N, max_len]
    (not left padding) limited to the slots written so far. So torch.compile traces it once and reruns the same
    graph at every step (and CUDA graphs can replay it): nothing in it changes shape or is a Python number that
    changes (gpt-fast's design)."""
    written = torch.arange(valid.shape[1], device=valid.device) <= slot
    return model(token[:, None], positions[:, None], cache, slot, (valid & written)[:, None, None, :])[:, -1]


_compiled_steps = {}


def compiled_decode_step(mode=None):
    """decode_step under torch.compile (inductor; mode e.g. "reduce-overhead" for CUDA graphs), made once per
    mode so that its compiled graphs are reused by every generate call. A new batch size (stopped rows leaving)
    or cache length (another call) costs one recompile, after which dynamo keeps those sizes symbolic."""
    if mode not in _compiled_steps:
        _compiled_steps[mode] = torch.compile(decode_step, mode=mode)
    return _compiled_steps[mode]


def mark_static(cache):
    """CUDA graphs replay fixed addresses, and skip a graph that mutates an input unless that input is marked
    static: the KV cache, written in place at every step, is."""
    for k, v in cache:
        torch._dynamo.mark_static_address(k)
        torch._dynamo.mark_static_address(v)


# ----------------------------------------------------------------------------------------------------------------
# LoRA (Hu et al. 2021, arXiv 2106.09685) as PEFT implements it and the MedCritical authors ran it (LLaMA-Factory):
# each target linear layer of the blocks keeps its frozen W and adds (alpha / r) * B A dropout(x), A [r, in]
# kaiming-uniform, B [out, r] zero, so training starts exactly at the base model. The parameter names are PEFT's
# minus its adapter name (layers.0.self_attn.q_proj.lora_A.weight): PEFT's file names are "base_model.model." +
# hf_name. The reference model of LoRA DPO is this model inside `with lora_disabled(model)`.

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_FILE, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0  # LLaMA-Factory's default: 2 x rank
    dropout: float = 0.0
    targets: tuple = LORA_TARGETS


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, cfg: LoRAConfig):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        # fp32 whatever the base's dtype: updates of lr x Adam's ~1 would vanish in bf16's 8 bits of mantissa.
        kwargs = {"bias": False, "device": base.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Linear(self.in_features, cfg.rank, **kwargs)
        self.lora_B = nn.Linear(cfg.rank, self.out_features, **kwargs)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init_lora_weights=True
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        self.scaling, self.lora_enabled = cfg.alpha / cfg.rank, True

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.lora_enabled:
            return y
        # As PEFT: without autocast the adapter sees x in its own dtype and the sum is cast back to the base's dtype.
        # Under autocast x stays as it is (PEFT's fp32 copy would be cast back to bf16 and saved: one more activation).
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.weight.dtype)
        return (y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling).to(y.dtype)


def add_lora(model: Transformer, cfg: LoRAConfig) -> Transformer:
    """Freeze every parameter and give the target layers of every block an adapter (the only trainable tensors)."""
    if cfg.rank < 1 or not cfg.targets or set(cfg.targets) - set(LORA_TARGETS):
        raise ValueError(f"LoRA needs rank >= 1 and targets among {LORA_TARGETS}, got {cfg}")
    model.requires_grad_(False)
    for block in model.layers:
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                if name in cfg.targets:
                    setattr(parent, name, LoRALinear(child, cfg))
    model.lora = cfg
    return model


@contextlib.contextmanager
def lora_disabled(model):
    """The base model: every adapter off inside the block (LoRA DPO's reference, no second copy of the weights)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError("lora_disabled: the model has no LoRA adapters (the reference would be the policy itself)")
    for m in layers:
        m.lora_enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.lora_enabled = True


def merge_lora(state: dict, cfg: LoRAConfig) -> dict:
    """The plain state dict of a LoRA state dict: each W + (alpha / r) B A, computed in fp32, stored in W's dtype."""
    merged = {n: t for n, t in state.items() if ".lora_" not in n}
    for name, a in state.items():
        if name.endswith(".lora_A.weight"):
            prefix = name.removesuffix("lora_A.weight")
            w, b = merged[prefix + "weight"], state[prefix + "lora_B.weight"]
            merged[prefix + "weight"] = (w.float() + (cfg.alpha / cfg.rank) * (b.float() @ a.float())).to(w.dtype)
    return merged


def save_adapter(model: Transformer, path, state_dict=None, base_model=None):
    """adapter_model.safetensors (fp32, PEFT's tensor names) + adapter_config.json, which peft's
    PeftModel.from_pretrained and vLLM's LoRA loading read. Under FSDP pass the gathered full state dict. Keep it out
    of a model folder: transformers (with peft installed) would read that folder as an adapter, not a model."""
    cfg, path = model.lora, Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = state_dict if state_dict is not None else model.state_dict()
    tensors = {"base_model.model." + hf_name(n): t.detach().to("cpu").contiguous()
               for n, t in state.items() if ".lora_" in n}
    save_file(tensors, path / ADAPTER_FILE, metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "revision": None,
              "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
              "target_modules": list(cfg.targets), "bias": "none", "fan_in_fan_out": False,
              "init_lora_weights": True, "inference_mode": True, "use_rslora": False, "use_dora": False,
              "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
              "alpha_pattern": {}}
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def load_adapter(model: Transformer, path):
    """Fill a LoRA model's adapters from a folder save_adapter (or PEFT, same config) wrote."""
    path, cfg = Path(path), model.lora
    saved = json.loads((path / ADAPTER_CONFIG).read_text())
    if (saved["r"], saved["lora_alpha"], sorted(saved["target_modules"])) != (cfg.rank, cfg.alpha, sorted(cfg.targets)):
        raise ValueError(f"{path}: adapter r={saved['r']} alpha={saved['lora_alpha']} targets "
                         f"{saved['target_modules']} differ from this run's {cfg}")
    params = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    with safe_open(path / ADAPTER_FILE, framework="pt") as f:
        state = {n.removeprefix("base_model.model.").removeprefix("model."): f.get_tensor(n) for n in f.keys()}
    if state.keys() != params.keys():
        raise KeyError(f"{path}: adapter tensors {sorted(set(state) ^ set(params))[:5]} do not match the model")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])


# ----------------------------------------------------------------------------------------------------------------
# A small command line: sample from a checkpoint (or a random model) to check that a download works. Plain argparse
# and no templates import (this file is the bottom of the import graph), so the prompt is raw text.

# templates.chat([{"role": "user", "content": "患者，男，45岁，胸痛3小时。最可能的诊断是什么？"}]), written out
# (tests/test_model.py checks it): with no system message Qwen2.5's template inserts its default system turn.
CHAT_EXAMPLE = ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                "<|im_start|>user\n患者，男，45岁，胸痛3小时。最可能的诊断是什么？<|im_end|>\n<|im_start|>assistant\n")


def main():
    parser = argparse.ArgumentParser(description="Sample from a Qwen2 checkpoint (none: a small random model).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", help="Hugging Face Qwen2 folder (config.json, *.safetensors, tokenizer.json)")
    parser.add_argument("--prompt", default=CHAT_EXAMPLE, help="the text to continue, tokenized as is (the "
                        "default: one user turn in the chat format templates.chat writes)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to sample (>= 1)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32",
                        choices=["bfloat16", "float16", "float32"], help="weights and compute")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    args = parser.parse_args()
    if args.max_new_tokens < 1 or not 0 < args.top_p <= 1 or args.temperature < 0:
        parser.error("--max-new-tokens must be >= 1, --top-p in (0, 1], --temperature >= 0")
    if args.model is None:
        print("no --model given: sampling 16 tokens from a small random Qwen2-shaped model")
        cfg = ModelConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
        print(generate(init_weights(Transformer(cfg)).eval(), [[1, 2, 3], [4, 5]], 16, temperature=1.0,
                       num_samples=2))
        return
    try:
        model = load(args.model, dtype=getattr(torch, args.dtype), device=args.device)
        tok = load_tokenizer(args.model)
    except UserError as e:  # one line and exit 2, as templates.run_main does for the other scripts
        parser.exit(2, f"error: {e}\n")
    # Stop at the config's end-of-turn and end-of-text ids (templates.STOP_IDS for Qwen2.5-Instruct).
    [new] = generate(model, [tok.encode(args.prompt, add_special_tokens=False).ids], args.max_new_tokens,
                     temperature=args.temperature, top_p=args.top_p, stop_ids=model.config.stop_ids)
    print(tok.decode(new))


if __name__ == "__main__":
    main()
