"""
dpo.py: Stage 2 of MedCritical, Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290) in plain
PyTorch, on the self-correction pairs of selfplay.py (chosen: the student's correction that reached the gold answer;
rejected: its wrong trajectory), against a frozen reference ref (the policy pi's starting point):

    loss = -log sigmoid(beta * ((log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))))

with log-probs SUMMED over the reply tokens, plus two optional NLL terms per pair, each a mean over its tokens:
--rpo-alpha on the chosen reply (Iterative RPO) and --replay on an SFT example the pair carries. The training
machinery (FSDP2, AdamW + cosine, checkpoints, resume) is sft.py's. With --lora-rank the reference is the policy with
its adapters off (the authors' recipe: no second model).

    python dpo.py --model runs/sft/final --data pairs.jsonl --out runs/dpo            # one process
    torchrun --nproc-per-node 8 dpo.py --model runs/sft/final --data pairs.jsonl --out runs/dpo \\
        --precompute-ref                                 # 8 GPUs; add --resume to continue after a kill
    python dpo.py --model runs/sft/final --data pairs.jsonl --out runs/dpo-lora --lora-rank 8 --lr 1e-5 \\
        --epochs 10 --min-lr-ratio 0 --batch-size 16 --max-length 2048 --max-pairs 1000   # the authors', 1 GPU
    python dpo.py --estimate-memory --model Qwen2.5-7B-Instruct --world-size 8   # per-rank memory, allocates nothing
"""
import contextlib
import functools
import gc
import hashlib
import json
import math
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model import LOGPS_CHUNK, ModelConfig, load_tokenizer, lora_disabled, read_config
from sft import (add_training_args, all_reduce_sum, autocast, collate_rows, fit, get_rank, load_model, prepare_model,
                 print0, resume_point, start_run, target_logps, tokenize_records)
from templates import (ArgumentParser, UserError, checked, encode_chat, nonnegative_float, positive_float,
                       positive_int, run_main, special_ids)


# ----------------------------------------------------------------------------------------------------------------
# The loss


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta=0.1, label_smoothing=0.0, ipo=False):
    """Per-pair preference losses and implicit rewards, from [B] log-probs of whole responses.

    With z = (log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x)):

        DPO (Rafailov et al. 2023, eq. 7)       -log sigmoid(beta z)
        conservative DPO (label smoothing eps)  -(1 - eps) log sigmoid(beta z) - eps log sigmoid(-beta z)
        IPO (Azar et al. 2023, eq. 17; tau = beta)   (z - 1 / (2 beta))^2

    Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences") assumes each label is flipped with
    probability eps, so the loss no longer pushes z to infinity. IPO's square grows with the length of the responses
    when the log-probs are sums, so TRL (confirmed with the IPO authors, whose results used it) feeds it log-probs
    AVERAGED over the response tokens; the training step here does the same for --ipo, and this function takes z as
    given. logsigmoid, not log(sigmoid), keeps the loss and its gradient finite for |beta z| in the thousands.
    The rewards beta * (log pi - log ref) (eq. 5's implicit reward, up to beta log Z(x)) are detached: logging only."""
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    z = chosen_logratios - rejected_logratios
    if ipo:
        losses = (z - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * z) - label_smoothing * F.logsigmoid(-beta * z)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


# ----------------------------------------------------------------------------------------------------------------
# Sequence log-probs. A batch holds B pairs as 2B rows, the chosen rows then the rejected rows, right-padded: tokens
# [2B, T] and mask [2B, T] True on the reply tokens (sft.py's convention: mask[t] says token t is scored).


def concatenated_forward(model, batch):
    """(log pi(y_c|x), log pi(y_r|x)), [B] each: per row, the SUM of log p(token) over its reply tokens, in fp32 (the
    loss sees a small difference of two sums over thousands of tokens, and bf16 keeps 3 significant digits). Chosen
    and rejected rows run in ONE forward (one pass over the weights, which FSDP gathers once)."""
    return row_logps(model, batch["tokens"], batch["mask"]).chunk(2)


def row_logps(model, tokens, mask):
    """[B]: per row, the sum of log p(token) over its trained tokens (mask), in fp32."""
    token_logps = target_logps(model, tokens, mask)  # [n], row-major
    rows = mask[:, 1:].nonzero()[:, 0]  # the row of each scored token
    return torch.zeros(len(mask), device=token_logps.device).index_add(0, rows, token_logps)


# ----------------------------------------------------------------------------------------------------------------
# Data: the conversational preference JSONL TRL reads, one pair a line, extra keys kept as metadata:
#     {"prompt": [{"role": "user", "content": ...}], "chosen": [{"role": "assistant", "content": ...}],
#      "rejected": [{"role": "assistant", "content": ...}], "question_id": ..., ...}


def as_messages(value, role, where):
    if isinstance(value, str):  # TRL's "standard" form: plain text, read here as one message of `role`
        return [{"role": role, "content": value}]
    if not (isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value)):
        raise ValueError(f"{where}: expected a string or a non-empty list of chat messages, got {str(value)[:80]!r}")
    return value


def encode_pair(tokenizer, record, where):
    """(prompt_ids, chosen_ids, rejected_ids) of one preference record, as encode_chat tokenizes prompt + reply. It
    tokenizes the reply apart from the template, so both replies follow the same prompt ids, and a reply's ids are
    its content and <|im_end|> (the "\\n" after it conditions nothing: dropped)."""
    prompt = as_messages(record.get("prompt"), "user", f"{where} prompt")
    if prompt[-1]["role"] == "assistant":
        raise ValueError(f"{where}: the prompt ends with an assistant turn; the reply must be in chosen/rejected")
    replies = []
    for key in ("chosen", "rejected"):
        reply = as_messages(record.get(key), "assistant", f"{where} {key}")
        if len(reply) != 1 or reply[0]["role"] != "assistant":
            raise ValueError(f"{where}: {key} must be one assistant message")
        ids, mask = encode_chat(tokenizer, prompt + reply)
        end = max(i for i, trained in enumerate(mask) if trained) + 1  # past the reply's <|im_end|>
        start = max(i for i, trained in enumerate(mask[:end]) if not trained) + 1  # past the prompt
        replies.append(ids[start:end])
    return ids[:start], *replies


def through_first_wrong_line(tokenizer, chosen, rejected):
    """The rejected reply's tokens up to the end of the line where it first differs from the chosen one (all of it
    if they differ only in its last line).

    A correction keeps the steps its writer judged right and rewrites from the first one judged wrong, so that line
    is the mistake, as the corrector sees it. What the rejected reply writes after it mostly FOLLOWS from it (checks
    made against a misremembered fact, a conclusion drawn from wrong marks); scoring those tokens as rejected teaches
    the model to stop following its own steps. On the miniature, DPO on the teacher's corrections cost 9 points
    scored whole and gained 3 scored this way (miniature/README.md). The cut reply has no <|im_end|>: its log-prob is
    that of every reply starting with the wrong step, the preference Step-DPO (Lai et al. 2024, arXiv 2406.18629)
    trains on. The shared prefix cancels in z either way."""
    first = next((i for i, (c, r) in enumerate(zip(chosen, rejected)) if c != r), min(len(chosen), len(rejected)))
    for end in range(first, len(rejected)):
        if "\n" in tokenizer.decode([rejected[end]], skip_special_tokens=False):
            return rejected[:end + 1]
    return rejected


def load_pairs(path, tokenizer, max_length, max_prompt_length, truncate_rejected=False):
    """Tokenized pairs [{"prompt", "chosen", "rejected"}] and counts of what was truncated or skipped.

    With truncate_rejected, each rejected reply is scored only through its first wrong line (through_first_wrong_line).
    A pair longer than max_length loses prompt tokens from the left (the question's end stays next to the reply),
    down to max_prompt_length; if still too long, both replies are cut from the right. A pair is skipped (counted)
    when its line is bad, or when the two replies are identical (after any cut): such a pair has z = 0 for ever."""
    counts = dict(pairs=0, rejected_cut_after_first_wrong_line=0, prompt_truncated=0, responses_truncated=0,
                  skipped_bad=0, skipped_identical=0)
    examples, errors = [], []
    if not Path(path).is_file():
        raise UserError(f"{path}: no such data file")
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:  # its "line 1 column 59" is within the line: name the file's line
                raise ValueError(f"{path}:{n}: not JSON ({e.msg} at column {e.colno})") from None
            prompt, chosen, rejected = encode_pair(tokenizer, record, f"{path}:{n}")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            counts["skipped_bad"] += 1
            errors.append(str(e))
            continue
        if truncate_rejected:
            cut = through_first_wrong_line(tokenizer, chosen, rejected)
            counts["rejected_cut_after_first_wrong_line"] += len(cut) < len(rejected)
            rejected = cut
        longest, cut_prompt, cut_replies = max(len(chosen), len(rejected)), False, False
        if len(prompt) + longest > max_length:
            keep = min(len(prompt), max(max_prompt_length, max_length - longest))
            cut_prompt, prompt = keep < len(prompt), prompt[len(prompt) - keep:]
            budget = max_length - len(prompt)
            cut_replies, chosen, rejected = longest > budget, chosen[:budget], rejected[:budget]
        if chosen == rejected:
            counts["skipped_identical"] += 1
            continue
        counts["prompt_truncated"] += cut_prompt
        counts["responses_truncated"] += cut_replies
        examples.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    counts["pairs"] = len(examples)
    if errors:
        print0(f"{path}: skipped {len(errors)} bad lines, e.g. {errors[0]}")
    if not examples:
        raise UserError(f"{path}: no usable preference pairs ({counts})" + (f", e.g. {errors[0]}" if errors else ""))
    return examples, counts


def attach_replay(examples, path, tokenizer, max_length, seed):
    """--replay: each pair carries one SFT example (sft.py's data format) whose NLL joins its loss, so the steps and
    batches stay the pairs'. DPO on one kind of question moves what the model does on others (on the miniature,
    375 steps on the teacher's pairs about Stage 2's diseases cost 20 points on Stage 1's: miniature/README.md);
    replaying Stage 1's own data, bought before Stage 2, holds that in place. The examples are drawn in a seeded
    order without replacement (cycled if there are fewer than pairs) and fixed per pair, so a resumed run sees the
    same ones. Each pair's replay row runs in a second forward, so it adds one row's activations to the two of the
    pair's (--estimate-memory counts the pair's only). -> counts of what tokenize_records read."""
    replay, counts = tokenize_records(path, tokenizer, max_length, verbose=get_rank() == 0)
    if not replay:
        raise UserError(f"{path}: no usable replay examples ({counts})")
    order = random.Random(seed).sample(range(len(replay)), len(replay))
    for i, example in enumerate(examples):
        example["replay"] = replay[order[i % len(replay)]]
    return {**counts, "used": min(len(examples), len(replay))}


def collate(examples, pad_id, device="cpu"):
    """One micro-batch: the rows prompt + reply of the B chosen then the B rejected replies, in sft.collate_rows
    (the mask on each reply); "units" = B pairs (train_step divides by the pairs of the whole step), "n_tokens" all
    the rows' tokens (TRL's count: benchmarks/bench_dpo.py compares tokens/s); the precomputed reference log-probs
    "ref_logps" [2, B] if the examples carry them; "replay_tokens" / "replay_mask" [B, T] (--replay) likewise."""
    rows = [(e["prompt"] + e[key], [False] * len(e["prompt"]) + [True] * len(e[key]))
            for key in ("chosen", "rejected") for e in examples]
    batch = {**collate_rows(rows, pad_id, device), "units": len(examples), "n_tokens": sum(len(r) for r, _ in rows)}
    if "replay" in examples[0]:
        replay = collate_rows([e["replay"] for e in examples], pad_id, device)
        batch.update(replay_tokens=replay["tokens"], replay_mask=replay["mask"],
                     n_tokens=batch["n_tokens"] + replay["n_tokens"])
    if "ref_chosen" in examples[0]:
        batch["ref_logps"] = torch.tensor([[e["ref_chosen"] for e in examples],
                                           [e["ref_rejected"] for e in examples]], device=device)
    return batch


# ----------------------------------------------------------------------------------------------------------------
# The reference model: frozen, eval mode, the policy's compute dtype, sharded like it. Or, with --precompute-ref, its
# log-probs for every pair, computed once (each rank a slice, then summed across ranks) and cached beside the data.


def load_reference(path, device, world_size, dtype):
    ref = prepare_model(load_model(path), device, world_size, dtype=dtype)  # no fp32 master copy: nothing trains
    if world_size > 1:
        # FSDP2 keeps the root (embedding, final norm, head: 2 GiB in bf16 at 7B) gathered after forward, expecting
        # the backward that never comes for a frozen model. Reshard it after every forward, like the blocks.
        ref.set_reshard_after_forward(True)
    return ref.requires_grad_(False).eval()


def reference_cache_path(args, dtype, device):
    """data.jsonl.ref-<hash>.pt, the hash over everything the values depend on: the data file's bytes, the
    reference model (path and its weight files' sizes and times), the tokenizer, truncation, dtype and device."""
    h = hashlib.sha256(Path(args.data).read_bytes())
    ref = Path(args.ref_model or args.model)
    weights = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in ref.glob("*.safetensors"))
    h.update(repr((str(ref.resolve()), weights, str(Path(args.tokenizer or args.model).resolve()),
                   args.max_length, args.max_prompt_length, args.truncate_rejected, str(dtype),
                   device.type)).encode())
    return Path(args.data).with_name(f"{Path(args.data).name}.ref-{h.hexdigest()[:16]}.pt")


@torch.no_grad()
def precompute_reference(args, examples, pad_id, rank, world_size, device, dtype):
    """[2, N] fp32 reference log-probs (chosen, rejected) of every pair, from the cache file or computed now. `dtype`
    is the reference's parameter dtype; it computes in the policy's compute dtype (--dtype)."""
    policy_dtype = getattr(torch, args.dtype)
    path = reference_cache_path(args, (dtype, policy_dtype), device)
    # All ranks must agree (a file appearing between their checks would leave some computing alone, deadlocked).
    if all_reduce_sum(torch.tensor(float(path.is_file()), device=device)) == world_size:
        print0(f"reference log-probs: {path}")
        return torch.load(path, weights_only=True)
    warn_if_precompute_does_not_fit(args, device, world_size)  # the memory section, at the bottom
    ref = load_reference(args.ref_model or args.model, device, world_size, dtype)
    logps = torch.zeros(2, len(examples), dtype=torch.float64, device=device)
    mine, bs = list(range(rank, len(examples), world_size)), args.precompute_batch
    n_batches = math.ceil(math.ceil(len(examples) / world_size) / bs)  # the same on every rank: FSDP needs lockstep
    for b in tqdm(range(n_batches), desc="reference log-probs", disable=rank != 0):
        idx = mine[b * bs:(b + 1) * bs]
        batch = collate([examples[i] for i in idx or [0]], pad_id, device)  # [0]: a dummy, discarded
        with autocast(device, policy_dtype):  # exactly as the policy computes in training (sft.train_step)
            chosen, rejected = concatenated_forward(ref, batch)
        if idx:
            logps[:, idx] = torch.stack([chosen, rejected]).double()
    logps = all_reduce_sum(logps).float().cpu()  # each pair was computed on exactly one rank, zeros elsewhere
    if rank == 0:
        torch.save(logps, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)  # atomic: a killed run never leaves a half-written cache
    del ref, batch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the reference's memory is free for the whole run
    return logps


# ----------------------------------------------------------------------------------------------------------------
# Training


def batch_loss(model, batch, beta, label_smoothing=0.0, ipo=False, rpo_alpha=0.0, replay_weight=0.0, ref=None):
    """(sum over the micro-batch's pairs of the loss, {metric: sum}) for sft.train_step, which divides by the
    pairs of the whole optimizer step. The reference: the batch's precomputed "ref_logps", else the model `ref`,
    else (LoRA) the policy with its adapters off. ipo, rpo_alpha, replay_weight: see dpo_loss and below."""
    if "ref_logps" in batch and ref is None:
        ref_chosen, ref_rejected = batch["ref_logps"]
    else:  # first, so that its (no-grad) logits and activations are gone before the policy's graph is built
        with torch.no_grad(), contextlib.nullcontext() if ref is not None else lora_disabled(model):
            ref_chosen, ref_rejected = concatenated_forward(model if ref is None else ref, batch)
    chosen, rejected = concatenated_forward(model, batch)
    n_tokens = batch["mask"][:, 1:].sum(-1).view(2, -1)  # reply tokens of the chosen / rejected rows
    logps = torch.stack([chosen, rejected, ref_chosen, ref_rejected])
    if ipo:  # per-token means, as the IPO authors and TRL use them (see dpo_loss)
        logps = logps / n_tokens.repeat(2, 1)
    losses, chosen_rewards, rejected_rewards = dpo_loss(*logps, beta, label_smoothing, ipo)
    if rpo_alpha:  # Iterative RPO (Pang et al. 2024, eq. 3): + alpha * the chosen reply's NLL per token
        losses = losses - rpo_alpha * chosen / n_tokens[0]
    metrics = {"rewards/chosen": chosen_rewards.sum(), "rewards/rejected": rejected_rewards.sum(),
               "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
               "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
               "logps/chosen": chosen.detach().sum(), "logps/rejected": rejected.detach().sum()}
    if "replay_tokens" in batch:  # --replay: + weight * the NLL per token of the SFT example each pair carries
        mask = batch["replay_mask"]
        replay_nll = -row_logps(model, batch["replay_tokens"], mask) / mask[:, 1:].sum(-1)
        losses, metrics["nll/replay"] = losses + replay_weight * replay_nll, replay_nll.detach().sum()
    return losses.sum(), metrics


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face Qwen2 folder: the SFT model, policy and reference")
    p.add_argument("--ref-model", help="reference model folder, if not --model")
    p.add_argument("--tokenizer", help="folder with tokenizer.json, if not --model")
    p.add_argument("--data", help="preference pairs, JSONL (prompt / chosen / rejected)")
    p.add_argument("--beta", type=positive_float, default=0.3, help="KL strength (the authors' 0.3)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="conservative DPO: P(label flipped)")
    p.add_argument("--ipo", action="store_true", help="IPO loss instead of the sigmoid (beta = tau)")
    p.add_argument("--rpo-alpha", type=nonnegative_float, default=0.0,
                   help="weight of the chosen NLL term (Iterative RPO: 1)")
    p.add_argument("--replay", help="SFT data (sft.py's JSONL): each pair adds one example's NLL per token")
    p.add_argument("--replay-weight", type=nonnegative_float, default=1.0, help="weight of the --replay NLL")
    p.add_argument("--truncate-rejected", action="store_true",
                   help="score each rejected reply only through the line where it first differs from its chosen")
    p.add_argument("--max-length", type=checked(int, 2), default=4096, help="prompt + reply tokens per sequence")
    p.add_argument("--max-prompt-length", type=positive_int, default=1024,
                   help="prompt tokens kept when cutting a pair")
    p.add_argument("--max-pairs", type=checked(int, 0), default=0, help="train on the first N usable pairs (0: all)")
    p.add_argument("--precompute-ref", action="store_true", help="reference log-probs once, then free the model")
    p.add_argument("--precompute-batch", type=positive_int, default=4, help="pairs per forward when precomputing")
    p.add_argument("--estimate-memory", action="store_true",
                   help="print per-rank memory for --model (a folder or a config.json); needs no --data/--out")
    p.add_argument("--world-size", type=positive_int, default=8, help="ranks, for --estimate-memory")
    # Full fine-tuning wants a far smaller lr than the authors' LoRA 1e-5; 64 pairs = 8 ranks x 8 micro-batches.
    add_training_args(p, lr=5e-7, batch_size=64, epochs=1, micro_batch_size=1, save_every=100, require_out=False)
    args = p.parse_args(argv)
    if not args.estimate_memory and not (args.data and args.out):
        p.error("--data and --out are required (unless --estimate-memory)")
    if not 0 < args.max_prompt_length < args.max_length:
        p.error("need 0 < --max-prompt-length < --max-length")
    if not 0 <= args.label_smoothing < 0.5:
        p.error("--label-smoothing must be in [0, 0.5)")
    if args.lora_rank and args.ref_model and not args.precompute_ref:
        p.error("--ref-model with --lora-rank: the LoRA reference is --model with the adapters off")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.estimate_memory:
        return print_memory(ModelConfig.from_hf(read_config(args.model)), args.world_size, args.micro_batch_size,
                            args.max_length, args.lora_rank or 8, args.precompute_batch)
    rank, world_size, device = start_run(args)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    pad_id = special_ids(tokenizer)["endoftext"]  # any id: padding is masked and after every real token
    examples, counts = load_pairs(args.data, tokenizer, args.max_length, args.max_prompt_length,
                                  args.truncate_rejected)
    if args.max_pairs and len(examples) > args.max_pairs:  # LLaMA-Factory's max_samples (the authors': 1000)
        counts["left_out_by_max_pairs"], examples = len(examples) - args.max_pairs, examples[:args.max_pairs]
    if args.replay:
        counts["replay"] = attach_replay(examples, args.replay, tokenizer, args.max_length, args.seed)
    print0(f"{args.data}: {json.dumps(counts)}")
    loss_args = {k: getattr(args, k) for k in ("beta", "label_smoothing", "ipo", "rpo_alpha", "replay_weight")}
    # Resuming needs the same pairs, loss and reference too (the reference path: a resumed policy loads from the
    # checkpoint, the reference from --ref-model / --model).
    checkpoint, start_step, settings = resume_point(
        args, examples, **loss_args, reference=str(Path(args.ref_model or args.model).resolve()),
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, max_pairs=args.max_pairs)
    # The reference computes exactly as the policy does: FSDP mixed precision gathers the policy's fp32 weights as
    # bf16, so a sharded reference is stored bf16, and so is a LoRA base on GPU (the compute dtype); unsharded, the
    # policy's weights stay fp32 (under bf16 autocast on GPU), and so do the reference's. Else step 0 is not ln 2.
    mixed_precision = device.type == "cuda" and args.dtype == "bfloat16"
    ref_dtype = torch.bfloat16 if mixed_precision and (world_size > 1 or args.lora_rank) else torch.float32
    ref = None  # LoRA without --precompute-ref: the reference is the policy with its adapters off
    if args.precompute_ref:
        ref_logps = precompute_reference(args, examples, pad_id, rank, world_size, device, ref_dtype)
        for e, (chosen, rejected) in zip(examples, ref_logps.T.tolist()):
            e["ref_chosen"], e["ref_rejected"] = chosen, rejected
    elif not args.lora_rank:
        ref = load_reference(args.ref_model or args.model, device, world_size, ref_dtype)
    fit(args, examples, functools.partial(collate, pad_id=pad_id, device=device),
        functools.partial(batch_loss, ref=ref, **loss_args), device, checkpoint, start_step, settings, desc="dpo",
        info=counts,
        bar_keys=("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"),
        length=lambda e: len(e["prompt"]) + max(len(e["chosen"]), len(e["rejected"])))


# ----------------------------------------------------------------------------------------------------------------
# Memory on paper (--estimate-memory, and precompute_reference's warning): what one rank holds, from the config's
# shapes alone. Each term is a tensor the code above keeps (named as it is kept), and the peak is the largest of the
# moments below; tests/test_dpo.py holds the sum to the resident memory of a real CPU step (vocabulary 152,064)
# within 15%.


def estimate_memory(cfg: ModelConfig, world_size, micro_batch, seq_len, precompute_ref=False, checkpointing=True,
                    lora_rank=0, compute_bytes=2, precompute_batch=4, chunk=None):
    """{"held": {what: bytes}, "moments": {when: bytes}, "peak": bytes, "n_params": int} per rank for one DPO
    training step (and the --precompute-ref pass). compute_bytes 2: bf16 compute on GPUs (FSDP2 mixed precision
    when world_size > 1, autocast on one GPU); 4: fp32, as on CPU. Sequences are taken as all response (every
    position scored), the worst case. Not counted: the CUDA context and NCCL buffers (1-3 GB), fragmentation."""
    H, I, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    kv, W, c, lora = cfg.num_key_value_heads * cfg.head_dim, world_size, compute_bytes, lora_rank > 0
    block = 2 * H * H + 2 * H * kv + H + 2 * kv + 3 * H * I + 2 * H  # q,o + k,v + biases + MLP + 2 norms
    root = V * H * (1 if cfg.tie_word_embeddings else 2) + H
    n_params, n = L * block + root, 2 * micro_batch * seq_len  # tokens per forward: chosen + rejected rows
    n_lora = L * lora_rank * (9 * H + 2 * kv + 3 * I)  # A [r, in] + B [out, r] on q, k, v, o, gate, up, down
    trainable = n_lora if lora else n_params
    gathered = c * (root + 2 * block) if W > 1 else 0  # FSDP2: the root, and a block running + one prefetched
    block_acts = n * (10 * H + 5 * kv + 4 * I) * c  # what autograd saves in one block (test_memory_estimate)
    chunk_logits = (chunk or LOGPS_CHUNK) * V * (4 + 2 * (c == 2))  # model.token_logps: fp32 (+ bf16 matmul out)
    ref_bytes = c if lora else 2 if c == 2 and W > 1 else 4  # main(): the policy's dtype as FSDP or autocast sees it
    held = {
        # fp32 master weights; LoRA: the frozen base in the compute dtype + fp32 adapters
        "parameters": ((c * n_params + 4 * n_lora) if lora else 4 * n_params) / W,
        "AdamW moments (2 x fp32)": 8 * trainable / W,
        "reference model": 0 if lora or precompute_ref else ref_bytes * n_params / W,
        "gathered root + 2 blocks (FSDP2, compute dtype)": gathered,
        "autocast's bf16 copies of the fp32 weights (1 GPU)": 2 * n_params if W == 1 and c == 2 and not lora else 0,
        # checkpointed: each block's input + one block's, recomputed in backward
        "activations": L * n * H * c + block_acts if checkpointing else L * block_acts,
        "hidden states at the scored positions": 2 * n * H * c,
        "one chunk of logits (token_logps)": chunk_logits,
        "head gradient, fp32, summed over chunks": 0 if lora else 4 * V * H + 2 * V * H * (c == 2),
        "gradients (fp32)": 4 * trainable / W,
        "gradients of the gathered units": 0 if lora else gathered,
        # torch.optim.AdamW's foreach path (the default on GPUs) makes one temporary per moment list; on CPU it
        # loops over tensors, one at a time
        "AdamW step temporaries": 4 * trainable / W if c == 2 else 4 * (n_lora // L // 7 if lora else V * H),
    }
    h = list(held.values())
    static = sum(h[:5])
    moments = {
        "forward": static + h[5] + h[6] + h[7],
        "backward through the head": static + h[5] + h[6] + h[7] + h[8] + (h[10] if W > 1 else 0),
        "optimizer step": static + h[9] + h[10] + h[11],
    }
    if precompute_ref:  # before the policy exists: the reference alone, no grad, 2 x precompute_batch rows
        n_pre = 2 * precompute_batch * seq_len
        moments["--precompute-ref pass"] = (ref_bytes * n_params / W + gathered + n_pre * (4 * H + 3 * I) * c
                                           + 2 * n_pre * H * c + chunk_logits)
    return {"held": held, "moments": moments, "peak": max(moments.values()), "n_params": n_params}


def print_memory(cfg, world_size, micro_batch, seq_len, lora_rank=8, precompute_batch=4):
    """The --estimate-memory table: full fine-tuning (live or precomputed reference) and LoRA, bf16 on GPUs."""
    print(f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}; world {world_size}, "
          f"micro batch {micro_batch} pairs (= {2 * micro_batch} rows) x {seq_len} tokens, bf16 compute, "
          f"--precompute-batch {precompute_batch}. GiB per rank:\n")
    cases = {"full, live ref, no ckpt": dict(checkpointing=False), "full, live ref, ckpt": {},
             "full, precomputed ref, ckpt": dict(precompute_ref=True),
             f"LoRA r={lora_rank}, ckpt": dict(lora_rank=lora_rank)}
    est = [estimate_memory(cfg, world_size, micro_batch, seq_len, precompute_batch=precompute_batch, **kw)
           for kw in cases.values()]
    print("| | " + " | ".join(cases) + " |")
    print("|---|" + "---|" * len(cases))
    rows = [(k, [e["held"][k] for e in est]) for k in est[0]["held"]]
    rows += [(f"*at the {k}*", [e["moments"].get(k, 0) for e in est]) for k in est[2]["moments"]]
    for name, values in rows:
        if any(values):
            print(f"| {name} | " + " | ".join(f"{v / 2**30:.1f}" if v else "-" for v in values) + " |")
    print("| **peak** | " + " | ".join(f"**{e['peak'] / 2**30:.1f}**" for e in est) + " |")
    print(f"\n{est[0]['n_params'] / 1e9:.2f}B parameters; add 1-3 GiB for the CUDA context and NCCL buffers.")


def warn_if_precompute_does_not_fit(args, device, world_size):
    """--precompute-batch against the GPU's memory, from estimate_memory; the largest batch that fits is suggested."""
    if device.type != "cuda":
        return
    config = json.loads((Path(args.ref_model or args.model) / "config.json").read_text())
    cfg, total = ModelConfig.from_hf(config), torch.cuda.get_device_properties(device).total_memory - 3 * 2**30
    c = 2 if getattr(torch, args.dtype) == torch.bfloat16 else 4
    need = lambda b: estimate_memory(cfg, world_size, 1, args.max_length, True, compute_bytes=c,  # noqa: E731
                                     precompute_batch=b)["moments"]["--precompute-ref pass"]
    if need(args.precompute_batch) > total:
        fits = max((b for b in range(1, args.precompute_batch) if need(b) <= total), default=0)
        print0(f"warning: --precompute-batch {args.precompute_batch} needs ~{need(args.precompute_batch) / 2**30:.0f}"
               f" GiB per GPU, more than the {total / 2**30:.0f} GiB usable; {fits or 'no batch'} would fit")


if __name__ == "__main__":
    run_main(main)
