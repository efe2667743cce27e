"""
Peak memory and time of one DPO step and one SFT step at Qwen2.5's vocabulary (152,064), three ways to the log-probs:

- before: the code before issue 13, kept here only: the head's [n, V] output for every scored position, .float(),
  logsumexp and gather (sft: F.cross_entropy), autograd through all of it; DPO scored the policy, then the reference;
- chunked: model.token_logps (what dpo.py and sft.py run): chunks of LOGPS_CHUNK positions, recomputed in backward;
- TRL: TRL 1.16's ChunkedLogProbFunction (vocabulary tiles of 32,768, in torch ops where Triton is absent) put in the
  place of model.token_logps.

    python benchmarks/bench_memory.py            # the README table (a few minutes on 2 cores)
    python benchmarks/bench_memory.py --small    # a seconds-long smoke run

Each case runs in its own process: a small Qwen2-shaped model (hidden 64, 2 layers, untied head, fp32), AdamW, one
warm-up step, then 3 timed steps (sft.train_step, with dpo.batch_loss and a live reference for DPO). "step
peak" = the most resident memory during a step above what is held before it (weights, reference, AdamW moments):
with a hidden size this small it is nearly all the loss part. On CPU it is the resident set (/proc/self/status
VmHWM, reset before each step through /proc/self/clear_refs; glibc's mmap threshold pinned so freed tensors leave
it); on a GPU, torch.cuda.max_memory_allocated above memory_allocated.
"""
import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import dpo  # noqa: E402
import model as model_py  # noqa: E402
import sft  # noqa: E402
from model import ModelConfig, Transformer, init_weights  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------
# The code before issue 13, for comparison only.


def before_concatenated_forward(model, batch):
    inputs, at, targets = sft.next_token_targets(batch["tokens"], batch["mask"])
    logits = model(inputs, logits_at=at).float()
    token_logps = logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)
    return torch.zeros(len(at), device=logits.device).index_add(0, at.nonzero()[:, 0], token_logps).chunk(2)


def before_preference_loss(model, batch, ref, beta=0.3):
    chosen, rejected = before_concatenated_forward(model, batch)  # the policy first, then the reference
    with torch.no_grad():
        ref_chosen, ref_rejected = before_concatenated_forward(ref, batch)
    losses, _, _ = dpo.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
    return losses.sum(), {}


def before_sft_loss(model, batch):
    inputs, at, targets = sft.next_token_targets(batch["tokens"], batch["mask"])
    return F.cross_entropy(model(inputs, logits_at=at).float(), targets, reduction="sum"), {}


def trl_token_logps(hidden, weight, targets, chunk_size=None):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    return ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 32768, None, 1.0, ())[0]


# ----------------------------------------------------------------------------------------------------------------
# One case, in its own process


def rss(field="VmRSS"):
    return int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1]) * 1024


def run_case(loss, path, seq_len, hidden, steps):
    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = ModelConfig(vocab_size=152064, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    policy = init_weights(Transformer(cfg)).to(device).train()
    g = torch.Generator().manual_seed(0)
    if loss == "dpo":  # one pair, both replies seq_len - 16 tokens after a 16-token prompt
        ref = init_weights(Transformer(cfg)).to(device).requires_grad_(False).eval()
        examples = [{"prompt": torch.randint(0, cfg.vocab_size, (16,), generator=g).tolist(),
                     **{k: torch.randint(0, cfg.vocab_size, (seq_len - 16,), generator=g).tolist()
                        for k in ("chosen", "rejected")}}]
        batch = dpo.collate(examples, 0, device)
        loss_fn = functools.partial(before_preference_loss, ref=ref) if path == "before" else \
            functools.partial(dpo.batch_loss, beta=0.3, ref=ref)
    else:  # one chat of 2 x seq_len tokens (the DPO pair's count), all but a 16-token prompt trained
        ids = torch.randint(0, cfg.vocab_size, (2 * seq_len,), generator=g).tolist()
        batch = sft.collate_rows([(ids, [False] * 16 + [True] * (len(ids) - 16))], 0, device)
        loss_fn = before_sft_loss if path == "before" else sft.sft_loss
    if path == "trl":
        model_py.token_logps = trl_token_logps
    optimizer = sft.build_optimizer(policy, 1e-5)
    step = functools.partial(sft.train_step, policy, optimizer, [batch], loss_fn, 1e-5, 1.0, device)
    step()  # warm-up: AdamW's moments exist from here on
    peaks, seconds = [], []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            held = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current resident set
            held = rss()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
        peaks.append((torch.cuda.max_memory_allocated() if device.type == "cuda" else rss("VmHWM")) - held)
    n_scored = int(batch["mask"][:, 1:].sum()) if loss == "dpo" else batch["units"]
    print(json.dumps({"peak": max(peaks), "seconds": statistics.median(seconds), "held": held, "n": n_scored,
                      "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.machine()}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="short sequences and 1 timed step, a smoke run")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each case (its fastest is reported)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: "loss:path" in a child process
    args = parser.parse_args()
    seq_len, hidden, steps = (256, 32, 1) if args.small else (1024, 64, 3)
    if args.case:
        return run_case(*args.case.split(":"), seq_len, hidden, steps)
    paths = ["before", "chunked"]
    try:
        import trl.kernels.chunked_logprob  # noqa: F401
        paths.append("trl")
    except ImportError:
        print("TRL not installed: its column is left out")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    results = {}
    for _ in range(args.repeats):  # the cases alternate, so a busy moment on a shared machine hits all of them
        for loss in ("dpo", "sft"):
            for path in paths:
                done = subprocess.run([sys.executable, __file__, "--case", f"{loss}:{path}"] + ["--small"] * args.small,
                                      env=env, capture_output=True, text=True)
                if done.returncode:
                    raise RuntimeError(f"{loss}:{path} failed:\n{done.stderr[-3000:]}")
                r = json.loads(done.stdout.strip().splitlines()[-1])
                old = results.setdefault((loss, path), r)  # the fastest run's time; the peak does not vary
                old["seconds"] = min(old["seconds"], r["seconds"])
    r = results["dpo", "before"]
    print(f"\n{r['device']}, torch {torch.__version__}, 1 thread; vocab 152,064, hidden {hidden}, 2 layers, fp32; "
          f"chunk {model_py.LOGPS_CHUNK} positions; median of {steps} steps after a warm-up, fastest of {args.repeats} "
          "runs\n")
    print("| step | scored positions | log-probs | step peak MiB | vs before | s / step | vs before |")
    print("|---|---|---|---|---|---|---|")
    for loss in ("dpo", "sft"):
        before = results[loss, "before"]
        for path in paths:
            r = results[loss, path]
            print(f"| {loss.upper()} | {r['n']} | {path} | {r['peak'] / 2**20:.0f} | {r['peak'] / before['peak']:.2f} | "
                  f"{r['seconds']:.2f} | {r['seconds'] / before['seconds']:.2f} |")
    n, V = results["dpo", "before"]["n"], 152064
    print(f"\n(one [n, V] fp32 tensor at the DPO step: {n * V * 4 / 2**20:.0f} MiB; before, DPO's step peak was "
          f"{results['dpo', 'before']['peak'] / (n * V * 4):.1f} of them)")


if __name__ == "__main__":
    main()
