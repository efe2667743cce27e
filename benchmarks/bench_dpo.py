"""
DPO training throughput: dpo.py against TRL's DPOTrainer, same small model, same pairs, one run, CPU.

    python benchmarks/bench_dpo.py            # the README numbers (a few minutes on 2 cores)
    python benchmarks/bench_dpo.py --small    # a seconds-long smoke run

Both sides train the same weights (model.save, read back by transformers' Qwen2ForCausalLM.from_pretrained) on the
same 64 pairs with the same sigmoid loss, beta, lr, AdamW betas, warmup + cosine, batch, micro-batch, max length,
activation checkpointing and fp32; no evaluation, no checkpoint inside the timed steps. Each runs with a live
reference model, then with precomputed reference log-probs (dpo.py --precompute-ref; TRL precompute_ref_log_probs).
tokens/s = real (non-padding) tokens of the chosen and rejected rows per second of optimizer steps, the first step
(warm-up) left out; "setup" is the wall time before the first step (loading, tokenizing, the precompute pass).
"""
import argparse
import json
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dpo  # noqa: E402
from model import ModelConfig, Transformer, init_weights, save  # noqa: E402
from templates import chat  # noqa: E402

SYMPTOMS = "发热咳嗽胸痛头痛腹泻皮疹黄疸水肿乏力心悸气短恶心呕吐眩晕"


def make_pairs(n, seed=0):
    """Synthetic self-correction pairs: a question, a long reasoning chosen reply, a shorter wrong one."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        findings = "、".join(rng.choice(SYMPTOMS) for _ in range(rng.randint(8, 20)))
        steps = "\n".join(f"第{k}步：{''.join(rng.choice(SYMPTOMS) for _ in range(rng.randint(10, 30)))}"
                          for k in range(rng.randint(8, 16)))
        wrong = steps[:len(steps) // 2]
        question = f"病例{i}：{findings}。最可能的诊断是？A 甲 B 乙 C 丙"
        pairs.append({"prompt": [{"role": "user", "content": question}],
                      "chosen": [{"role": "assistant", "content": f"<think>\n{steps}\n</think>\n答案：A"}],
                      "rejected": [{"role": "assistant", "content": f"<think>\n{wrong}\n</think>\n答案：B"}]})
    return pairs


def make_tokenizer(pairs, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([chat(p["prompt"] + p[k], False) for p in pairs for k in ("chosen", "rejected")], trainer)
    return tok


def run_ours(d, args, precompute):
    """-> ([(tokens, seconds)] of steps 2.., setup seconds). sft.fit times each step from the end of the previous
    one (batch building included, its own logging not), and logs tokens and tokens/s."""
    out = d / f"ours-{precompute}"
    shutil.rmtree(out, ignore_errors=True)
    for cache in d.glob("pairs.jsonl.ref-*"):  # no cached reference log-probs: time the precompute pass too
        cache.unlink()
    argv = ["--model", str(d / "model"), "--data", str(d / "pairs.jsonl"), "--out", str(out), "--lr", "1e-5",
            "--beta", "0.3", "--batch-size", str(args.batch), "--micro-batch-size", str(args.micro), "--steps",
            str(args.steps), "--max-length", str(args.max_length), "--max-prompt-length", "256", "--save-every",
            str(10**6), "--dtype", "float32", "--activation-checkpointing"] + ["--precompute-ref"] * precompute
    t0 = time.perf_counter()
    dpo.main(argv)
    records = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    steps = [(r["tokens"], r["tokens"] / r["tokens_per_s"]) for r in records]
    return steps[1:], time.perf_counter() - t0 - sum(s for _, s in steps)  # setup, + the final save and exit


def run_trl(d, args, precompute):
    """-> ([(tokens, seconds)] of steps 2.., setup seconds). A step is timed from the end of the previous one (batch
    building and TRL's logging included); tokens are TRL's own count (attention mask sums, chosen + rejected)."""
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(d / "model" / "tokenizer.json"), eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    # TRL's "standard" (text) form with our exact chat text, so both sides see the same tokens.
    rows = [{"prompt": chat(p["prompt"]), "chosen": p["chosen"][0]["content"] + "<|im_end|>",
             "rejected": p["rejected"][0]["content"] + "<|im_end|>"} for p in make_pairs(args.pairs)]
    config = DPOConfig(
        output_dir=str(d / f"trl-{precompute}"), per_device_train_batch_size=args.micro,
        gradient_accumulation_steps=args.batch // args.micro, max_steps=args.steps, learning_rate=1e-5, beta=0.3,
        loss_type=["sigmoid"], max_length=args.max_length, lr_scheduler_type="cosine", warmup_steps=0.05,
        adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0, gradient_checkpointing=True, bf16=False,
        use_cpu=True, precompute_ref_log_probs=precompute, logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=0)
    step_ends = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            step_ends.append(time.perf_counter())

        def on_step_end(self, *a, **kw):
            step_ends.append(time.perf_counter())

    t0 = time.perf_counter()
    trainer = DPOTrainer(model=str(d / "model"), args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=[Clock()])
    trainer.train()
    tokens = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h and "loss" in h]
    steps = [(tokens[i] - tokens[i - 1], step_ends[i + 1] - step_ends[i]) for i in range(1, len(tokens))]
    return steps, step_ends[0] - t0  # setup: up to the start of training


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="a tiny model and 3 steps, for a smoke run")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each of the four cases")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.pairs, args.batch, args.micro, args.max_length = 64, 8, 2, 512
    args.steps = 3 if args.small else 6
    hidden, layers, inter, vocab = (64, 2, 128, 512) if args.small else (256, 4, 704, 4096)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        pairs = make_pairs(args.pairs)
        (d / "pairs.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
        tok = make_tokenizer(pairs, vocab)
        cfg = ModelConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=inter,
                          num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
                          tie_word_embeddings=False, bos_token_id=0, eos_token_id=tok.token_to_id("<|im_end|>"))
        model = init_weights(Transformer(cfg))
        save(model, d / "model")
        tok.save(str(d / "model" / "tokenizer.json"))
        examples, _ = dpo.load_pairs(d / "pairs.jsonl", tok, args.max_length, 256)
        mean_len = sum(len(e["prompt"]) * 2 + len(e["chosen"]) + len(e["rejected"]) for e in examples) / len(examples)
        n_params = sum(p.numel() for p in model.parameters())
        steps, setup = {}, {}
        for _ in range(args.repeats):  # alternate the four runs, so a busy moment hits all of them alike
            for precompute in (False, True):
                for name, run in (("dpo.py", run_ours), ("TRL", run_trl)):
                    runs, seconds = run(d, args, precompute)
                    steps.setdefault((name, precompute), []).extend(runs)
                    setup.setdefault((name, precompute), []).append(seconds)
    print(f"\nmachine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; model "
          f"{n_params / 1e6:.1f}M params fp32 (hidden {hidden}, {layers} layers, vocab {cfg.vocab_size}); {args.pairs} "
          f"pairs, {mean_len:.0f} tokens a pair; batch {args.batch} pairs in micro-batches of {args.micro}; "
          f"{args.steps} steps x {args.repeats} runs each, activation checkpointing on both sides\n")
    # The median over steps of a step's tokens/s, the warm-up step of each run left out: robust to other work.
    rate = {k: statistics.median(t / s for t, s in v) for k, v in steps.items()}
    print("| reference | dpo.py tokens/s | TRL tokens/s | dpo.py / TRL | dpo.py setup s | TRL setup s |")
    print("|---|---|---|---|---|---|")
    for pre in (False, True):
        print(f"| {'precomputed' if pre else 'live model'} | {rate['dpo.py', pre]:.0f} | {rate['TRL', pre]:.0f} | "
              f"{rate['dpo.py', pre] / rate['TRL', pre]:.2f} | {min(setup['dpo.py', pre]):.1f} | "
              f"{min(setup['TRL', pre]):.1f} |")
    print(f"\nprecomputed / live reference: dpo.py {rate['dpo.py', True] / rate['dpo.py', False]:.2f}x, "
          f"TRL {rate['TRL', True] / rate['TRL', False]:.2f}x; dpo.py precomputed / TRL live "
          f"{rate['dpo.py', True] / rate['TRL', False]:.2f}x")


if __name__ == "__main__":
    main()
