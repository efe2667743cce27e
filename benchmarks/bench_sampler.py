"""
Sampler benchmark: model.generate, eager and compiled, against transformers' generate, same random weights, one run.

    python benchmarks/bench_sampler.py            # fp32 on CPU, the numbers in the README
    python benchmarks/bench_sampler.py --small    # a quick smoke run (compiling still takes a minute)

Reports tokens/s (new tokens over wall time, prefill included) at batch 1 and batch 8 (64-token prompts), and for
8 samples of one 512-token prompt (ours prefills the prompt once; transformers uses num_return_sequences=8), the
ratio to transformers, and the fraction of the memory-bandwidth roofline: each decode step must stream every
weight byte once, so tokens/s can be at most rows * bandwidth / weight bytes (bandwidth measured here, in the same
run, as a streaming read of a 1 GiB tensor). The compiled column is generate(compile=True): the decode step
under torch.compile (inductor), timed after a warm-up call that compiles it. Then the miniature's 0.9M-parameter
student (miniature/student.py's config, vocab 1,000) at its sampling batch, 128 ragged prompts x 2 samples, where
a decode step is a few hundred small ops: ours eager against ours compiled.
"""
import argparse
import functools
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import ModelConfig, Transformer, generate, init_weights, load, save  # noqa: E402


def best_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def best_times(fns, repeats):
    """Best wall time of each function, the runs interleaved so that load from elsewhere hits both alike."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            ts.append(best_time(fn, 1))
    return [min(ts) for ts in times]


def read_bandwidth(nbytes=2**30, repeats=5):
    x = torch.ones(nbytes // 4)
    x.sum()
    return nbytes / best_time(lambda: x.sum(), repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="a tiny model, for a smoke run")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.small:
        cfg = ModelConfig(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
    else:  # Qwen2-0.5B's shape
        cfg = ModelConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                          num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)
    from transformers import Qwen2ForCausalLM
    with tempfile.TemporaryDirectory() as d:
        # Both sides load the same checkpoint folder through their own loaders, as users run them.
        save(init_weights(Transformer(cfg)), d)
        ours = load(d)
        theirs = Qwen2ForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())  # tied weights counted once
    bandwidth = read_bandwidth()
    n = args.new_tokens

    def hf_generate(prompts, **kw):
        ids = torch.tensor(prompts)
        with torch.inference_mode():
            theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                            pad_token_id=0, **kw)

    g = torch.Generator().manual_seed(0)
    cases = [
        ("batch 1, greedy", [torch.randint(0, cfg.vocab_size, (64,), generator=g).tolist()], 1, {}, {}),
        ("batch 8, greedy", [torch.randint(0, cfg.vocab_size, (64,), generator=g).tolist() for _ in range(8)], 1, {}, {}),
        ("8 samples of 512", [torch.randint(0, cfg.vocab_size, (512,), generator=g).tolist()], 8,
         {"temperature": 1.0, "top_p": 0.9}, {"do_sample": True, "top_p": 0.9, "num_return_sequences": 8}),
    ]
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"model {sum(p.numel() for p in ours.parameters()) / 1e6:.0f}M params fp32; "
          f"{n} new tokens; read bandwidth {bandwidth / 1e9:.1f} GB/s")
    print("| case | ours tok/s | ours compiled tok/s | transformers tok/s | ours / transformers | compiled / ours "
          "| ours % of roofline |")
    print("|---|---|---|---|---|---|---|")
    for name, prompts, samples, ours_kw, hf_kw in cases:
        rows = len(prompts) * samples
        ours_fn = functools.partial(generate, ours, prompts, n, num_samples=samples, **ours_kw)
        ours_fn(compile=True)  # compile (or recompile for these shapes) before timing
        t_ours, t_compiled, t_hf = best_times([ours_fn, lambda: ours_fn(compile=True),
                                               lambda: hf_generate(prompts, **hf_kw)], args.repeats)
        roofline = rows * bandwidth / weight_bytes
        ours_tps, compiled_tps, hf_tps = rows * n / t_ours, rows * n / t_compiled, rows * n / t_hf
        print(f"| {name} | {ours_tps:.1f} | {compiled_tps:.1f} | {hf_tps:.1f} | {ours_tps / hf_tps:.2f}x | "
              f"{compiled_tps / ours_tps:.2f}x | {100 * ours_tps / roofline:.0f}% |")
    miniature(args)


def miniature(args):
    """The miniature's student at its sampling batch: eager against compiled, greedy and at selfplay's settings."""
    cfg = ModelConfig(vocab_size=1000, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024, rope_theta=1e4)
    student = init_weights(Transformer(cfg), std=0.05).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (int(torch.randint(80, 121, (1,), generator=g)),),
                             generator=g).tolist() for _ in range(16 if args.small else 128)]
    n = 4 * args.new_tokens
    print(f"\nminiature student: {sum(p.numel() for p in student.parameters()) / 1e6:.2f}M params, "
          f"{len(prompts)} prompts of 80-120 tokens x 2 samples, {n} new tokens (no stop)")
    print("| case | ours ms per new token (prefill included) | compiled | compiled / ours |")
    print("|---|---|---|---|")
    for name, kw in (("greedy", {}), ("temperature 0.7, top_p 0.9", {"temperature": 0.7, "top_p": 0.9})):
        fn = functools.partial(generate, student, prompts, n, num_samples=2, **kw)
        fn(compile=True)
        t_ours, t_compiled = best_times([fn, lambda: fn(compile=True)], args.repeats)
        print(f"| {name} | {1e3 * t_ours / n:.2f} | {1e3 * t_compiled / n:.2f} | {t_ours / t_compiled:.2f}x |")


if __name__ == "__main__":
    main()
