"""
GPU check: what this project could not measure without a GPU, in one run of a few minutes on one CUDA GPU.

    python benchmarks/gpu_check.py                 # Qwen2.5-7B-shaped random weights, bf16, ~5 minutes
    python benchmarks/gpu_check.py --no-compile    # skip torch.compile (the slowest part: ~1-2 min of compiling)
    python benchmarks/gpu_check.py --cpu-smoke     # a tiny model on CPU: checks that the script itself runs

No downloads: the model is built on the meta device, allocated on the GPU and filled with random numbers there.
It prints one table:
  1. which SDPA backend (flash, memory-efficient, cuDNN, math) runs the attention of a masked GQA decode step and of
     a ragged (masked) prefill, both as model.py writes it now (query groups folded into the query axis) and as it
     was (enable_gqa=True with a mask); each backend is forced with torch.nn.attention.sdpa_kernel and reports
     "ok <ms>" or why it refused;
  2. decode ms/step of model.generate, eager and compiled (torch.compile of model.decode_step), at batch 32 and 64;
  3. peak memory of one full DPO step (fp32 master weights, AdamW, bf16 autocast, activation checkpointing) on one
     pair of 2 x 4,096 tokens. A single GPU cannot hold full 7B DPO with AdamW (16 bytes a parameter = 122 GB), so
     this runs the 7B shapes with 1 and 2 decoder layers, takes the difference as the cost of a layer and
     extrapolates to 28 layers (one GPU, no sharding) and to FSDP over 8 GPUs (parameter, gradient and AdamW bytes
     divided by 8, activations not);
  4. peak memory of one --precompute-ref batch (4 pairs x 2 x 4,096 tokens, no grad) on the whole bf16 model.
"""
import argparse
import functools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dpo  # noqa: E402
import model as M  # noqa: E402
import sft  # noqa: E402

QWEN25_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                 tie_word_embeddings=False)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False)
GIB = 2**30


def build(cfg, device, dtype):
    """A random model with no host copy: built on the meta device, allocated on `device`, filled there."""
    with torch.device("meta"):
        model = M.Transformer(cfg)
    model = model.to(dtype).to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
    return model.eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats=3):
    fn()  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


def peak_gib(device, fn):
    if device.type != "cuda":
        fn()
        return float("nan")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated() / GIB


# ----------------------------------------------------------------------------------------------------------------
# 1. SDPA backends for masked GQA


def attention_inputs(cfg, batch, q_len, kv_len, device, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    d, h, hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    q = torch.randn(batch, h, q_len, d, device=device, dtype=dtype, generator=g)
    k = torch.randn(batch, hkv, kv_len, d, device=device, dtype=dtype, generator=g)
    v = torch.randn(batch, hkv, kv_len, d, device=device, dtype=dtype, generator=g)
    pad = torch.randint(0, kv_len // 4, (batch,), device=device, generator=g)  # ragged left padding
    slots = torch.arange(kv_len, device=device)
    valid = slots[None] >= pad[:, None]
    if q_len == 1:  # decode: the newest token sees every real slot
        mask = valid[:, None, None, :]
    else:  # prefill: causal over real keys, a padding query sees itself
        causal = slots[:q_len, None] >= slots[None, :kv_len]
        mask = ((causal & valid[:, None, :]) | torch.eye(q_len, kv_len, dtype=torch.bool, device=device))[:, None]
    return q, k, v, mask


def folded(q, k, v, mask):
    """model.py's masked GQA: the query groups folded into the query axis."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    mask = mask.expand(B, 1, T, S)[:, :, None].expand(B, 1, G, T, S).reshape(B, 1, G * T, S)
    return F.scaled_dot_product_attention(q.reshape(B, Hkv, G * T, D), k, v, attn_mask=mask).view(B, H, T, D)


def with_enable_gqa(q, k, v, mask):
    """The previous form: enable_gqa=True together with a boolean mask."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def sdpa_rows(cfg, device, dtype, smoke):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = [("flash", SDPBackend.FLASH_ATTENTION), ("mem-efficient", SDPBackend.EFFICIENT_ATTENTION),
                ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)]
    cases = [("decode, batch 32, 2,673 slots", 32, 1, 2673), ("prefill, batch 8, 2,048 tokens", 8, 2048, 2048)]
    if smoke:
        cases = [("decode, batch 4, 40 slots", 4, 1, 40), ("prefill, batch 2, 32 tokens", 2, 32, 32)]
    rows = []
    for case, batch, q_len, kv_len in cases:
        q, k, v, mask = attention_inputs(cfg, batch, q_len, kv_len, device, dtype)
        reference = with_enable_gqa(q.float(), k.float(), v.float(), mask)
        for form, fn in (("folded (now)", folded), ("enable_gqa + mask (before)", with_enable_gqa)):
            results = []
            for name, backend in backends:
                try:
                    with sdpa_kernel(backend):
                        out = fn(q, k, v, mask)
                        err = (out.float() - reference).abs().max().item()
                        ms = 1e3 * timed(lambda: fn(q, k, v, mask), device)
                    results.append(f"{name}: ok {ms:.2f} ms (err {err:.0e})")
                except Exception as e:  # noqa: BLE001 - a backend that refuses is the result
                    results.append(f"{name}: no ({(str(e).splitlines() or [type(e).__name__])[0][:60]})")
            with torch.no_grad():  # what the default dispatch picks, read off the profiler
                picked = default_kernel(fn, q, k, v, mask)
            rows.append((f"SDPA {case}, {form}", "; ".join(results) + f" | default picks {picked}"))
    return rows


def default_kernel(fn, q, k, v, mask):
    from torch.profiler import profile
    with profile() as prof:
        fn(q, k, v, mask)
    names = [e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")]
    return ", ".join(sorted(set(names))) or "?"


# ----------------------------------------------------------------------------------------------------------------
# 2. Decode ms/step


def decode_rows(model, cfg, device, batches, prompt_len, steps, compile_modes):
    rows = []
    g = torch.Generator().manual_seed(0)
    for batch in batches:
        prompts = [torch.randint(0, cfg.vocab_size, (prompt_len - (i % 7),), generator=g).tolist()
                   for i in range(batch)]  # ragged, so decode runs with its padding mask
        for mode in [False] + compile_modes:
            label = "eager" if mode is False else f"compiled ({'inductor' if mode is True else mode})"
            try:
                t0 = time.perf_counter()
                M.generate(model, prompts, steps, compile=mode)  # warm-up (and compilation)
                sync(device)
                warm = time.perf_counter() - t0
                prefill = timed(lambda: M.generate(model, prompts, 1, compile=mode), device, repeats=1)
                total = timed(lambda: M.generate(model, prompts, steps, compile=mode), device, repeats=1)
                ms = 1e3 * (total - prefill) / (steps - 1)
                rows.append((f"decode ms/step, batch {batch}, {label}",
                             f"{ms:.1f} ms ({batch * 1e3 / ms:.0f} tok/s; first call incl. compile {warm:.0f} s)"))
            except Exception as e:  # noqa: BLE001 - a failed mode is a result to report, not the end of the check
                rows.append((f"decode ms/step, batch {batch}, {label}", f"failed: {type(e).__name__}: "
                             f"{str(e).splitlines()[0][:100]}"))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# 3. and 4. Memory


def pair_batch(cfg, seq_len, prompt_len, pairs, device):
    g = torch.Generator().manual_seed(1)
    examples = [{"prompt": torch.randint(0, cfg.vocab_size, (prompt_len,), generator=g).tolist(),
                 "chosen": torch.randint(0, cfg.vocab_size, (seq_len - prompt_len,), generator=g).tolist(),
                 "rejected": torch.randint(0, cfg.vocab_size, (seq_len - prompt_len,), generator=g).tolist(),
                 "ref_chosen": 0.0, "ref_rejected": 0.0} for _ in range(pairs)]
    return dpo.collate(examples, pad_id=0, device=device)


def dpo_step_peak(cfg, layers, device, seq_len, prompt_len):
    """Peak GiB of the second full DPO step (AdamW's moments exist from the first) with `layers` decoder layers."""
    small = M.ModelConfig(**{**vars(cfg), "num_hidden_layers": layers})
    policy = build(small, device, torch.float32).train()  # fp32 master weights, bf16 autocast, as dpo.py on 1 GPU
    policy.activation_checkpointing = True
    optimizer = sft.build_optimizer(policy, lr=1e-7)
    batch = pair_batch(small, seq_len, prompt_len, 1, device)
    loss_fn = functools.partial(dpo.batch_loss, beta=0.3, ref=None)
    step = lambda: sft.train_step(policy, optimizer, [batch], loss_fn, 1e-7, 1.0, device, torch.bfloat16)  # noqa
    step()
    peak = peak_gib(device, step)
    n_params = sum(p.numel() for p in policy.parameters())
    del policy, optimizer
    return peak, n_params


def memory_rows(cfg, device, seq_len, prompt_len):
    try:
        (p1, n1), (p2, n2) = (dpo_step_peak(cfg, layers, device, seq_len, prompt_len) for layers in (1, 2))
    except torch.OutOfMemoryError as e:
        return [("DPO step peak", f"out of memory: {str(e).splitlines()[0][:100]}")]
    per_layer, layer_params = p2 - p1, n2 - n1
    full = p1 + (cfg.num_hidden_layers - 1) * per_layer
    states = 16 / GIB  # fp32 weight + fp32 grad + 2 fp32 AdamW moments, per parameter
    n_full = n1 + (cfg.num_hidden_layers - 1) * layer_params
    fsdp8 = full - (7 / 8) * n_full * states  # states sharded 8 ways; activations and logits per rank unchanged
    return [
        (f"DPO step peak, 2 x {seq_len} tokens, 1 layer (measured)", f"{p1:.1f} GiB"),
        (f"DPO step peak, 2 x {seq_len} tokens, 2 layers (measured)", f"{p2:.1f} GiB"),
        ("  one more layer costs", f"{per_layer:.2f} GiB ({layer_params / 1e6:.0f}M params x 16 B = "
                                   f"{layer_params * states:.2f} GiB of weight/grad/AdamW, rest activations)"),
        (f"  extrapolated: {cfg.num_hidden_layers} layers, one GPU, no sharding", f"{full:.1f} GiB"),
        (f"  extrapolated: {cfg.num_hidden_layers} layers, FSDP on 8 GPUs (states / 8)",
         f"{fsdp8:.1f} GiB per rank, + the gathered bf16 blocks in flight"),
    ]


def precompute_ref_row(model, cfg, device, seq_len, prompt_len, pairs=4):
    batch = pair_batch(cfg, seq_len, prompt_len, pairs, device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / GIB
    label = f"precompute-ref batch peak, {pairs} pairs x 2 x {seq_len} tokens, bf16"
    try:
        with torch.no_grad():
            peak = peak_gib(device, lambda: dpo.concatenated_forward(model, batch))
    except torch.OutOfMemoryError as e:
        return label, f"out of memory (weights {weights:.1f} GiB): {str(e).splitlines()[0][:100]}"
    return label, f"{peak:.1f} GiB (weights {weights:.1f} GiB)"


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="32,64", help="decode batch sizes")
    parser.add_argument("--prompt-len", type=int, default=625, help="decode: prompt tokens (the README's mean)")
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=4096, help="DPO: tokens per row (prompt + reply)")
    parser.add_argument("--prompt-len-dpo", type=int, default=1024)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled decode rows")
    parser.add_argument("--cuda-graphs", action="store_true", help='also compile with mode="reduce-overhead"')
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU: check the script runs")
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a CUDA GPU and torch.cuda.is_available() is False here; run it on a "
                         "GPU machine (or --cpu-smoke to check the script on a tiny model)")
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    cfg = M.ModelConfig(**(TINY if args.cpu_smoke else QWEN25_7B))
    batches = [2, 4] if args.cpu_smoke else [int(b) for b in args.batches.split(",")]
    prompt_len, steps = (20, 8) if args.cpu_smoke else (args.prompt_len, args.decode_steps)
    seq_len, prompt_len_dpo = (64, 16) if args.cpu_smoke else (args.seq_len, args.prompt_len_dpo)
    compile_modes = [] if args.no_compile else [True] + (["reduce-overhead"] if args.cuda_graphs else [])

    started = time.perf_counter()
    name = "CPU (smoke)" if args.cpu_smoke else torch.cuda.get_device_name()
    rows = [("device", f"{name}, torch {torch.__version__}")]
    with torch.inference_mode():
        rows += sdpa_rows(cfg, device, dtype, args.cpu_smoke)
    model = build(cfg, device, dtype)
    rows.append(("model", f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params, random, {dtype}"))
    rows += decode_rows(model, cfg, device, batches, prompt_len, steps, compile_modes)
    rows.append(precompute_ref_row(model, cfg, device, seq_len, prompt_len_dpo))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rows += memory_rows(cfg, device, seq_len, prompt_len_dpo)
    rows.append(("wall time of this check", f"{time.perf_counter() - started:.0f} s"))
    print("| check | result |\n|---|---|")
    for what, result in rows:
        print(f"| {what} | {result} |")


if __name__ == "__main__":
    main()
