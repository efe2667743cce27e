"""Run by tests/test_dpo.py::test_memory_estimate_matches_a_measured_step in a fresh process (so the peak is this
case's alone): two DPO training steps (full fine-tuning with a live reference, or LoRA with the adapter-off one), or
the --precompute-ref pass, of the model folder argv[1]; prints {"peak": bytes} of resident memory above the baseline
taken after imports and a warm-up.

    python tests/memory_probe.py MODEL_DIR full|lora|precompute SEQ_LEN [PAIRS]"""
import functools
import json
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dpo  # noqa: E402
import sft  # noqa: E402
from model import LoRAConfig  # noqa: E402


def rss():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) * 1024


def batch_of(pairs, seq_len, vocab, prompt=8):
    """Chosen and rejected rows of seq_len tokens each, the first `prompt` tokens the prompt."""
    g = torch.Generator().manual_seed(0)
    examples = [{"prompt": torch.randint(0, vocab, (prompt,), generator=g).tolist(),
                 **{k: torch.randint(0, vocab, (seq_len - prompt,), generator=g).tolist() for k in ("chosen", "rejected")}}
                for _ in range(pairs)]
    return dpo.collate(examples, pad_id=0)


def main():
    folder, case, seq_len = sys.argv[1], sys.argv[2], int(sys.argv[3])
    pairs = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    warm = torch.nn.Linear(8, 8)  # autograd, AdamW and the matmul library set themselves up outside the count
    torch.optim.AdamW(warm.parameters()).step(warm(torch.randn(2, 8)).sum().backward())
    vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
    batch = batch_of(pairs, seq_len, vocab)
    base = rss()
    if case == "precompute":
        ref = dpo.load_reference(folder, cpu, 1, torch.float32)
        with torch.no_grad():
            dpo.concatenated_forward(ref, batch)
    else:
        lora = LoRAConfig(8, 16) if case == "lora" else None
        ref = None if lora else dpo.load_reference(folder, cpu, 1, torch.float32)
        policy = sft.prepare_model(sft.load_model(folder), cpu, 1, lora=lora)
        optimizer = sft.build_optimizer(policy, 1e-4)
        loss_fn = functools.partial(dpo.batch_loss, beta=0.1, ref=ref)
        for _ in range(2):  # the second step holds AdamW's moments
            sft.train_step(policy.train(), optimizer, [batch], loss_fn, 1e-4, 1.0, cpu)
    print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base}))


if __name__ == "__main__":
    main()
