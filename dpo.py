"""
dpo.py: Stage 2 of MedCritical, Direct Preference Optimization on self-correction pairs, in plain PyTorch.

The student fine-tuned by sft.py answered training questions; where it was wrong, the same model critiqued and
corrected itself (selfplay.py). A correction that reached the gold answer is `chosen`, the wrong trajectory
`rejected`. DPO (Rafailov et al. 2023, arXiv 2305.18290) trains the policy pi on these pairs against a frozen copy of
its starting point, the reference ref:

    loss = -log sigmoid(beta * ((log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))))

with log-probs SUMMED over the response tokens. The MedCritical authors used this sigmoid loss with beta 0.3, a cosine
schedule and 5% warmup (LoRA, lr 1e-5); the defaults here are for full fine-tuning of Qwen2.5-7B on 8 x 80 GB.

    python dpo.py --model runs/sft/final --data pairs.jsonl --out runs/dpo            # one process
    torchrun --nproc-per-node 8 dpo.py --model runs/sft/final --data pairs.jsonl --out runs/dpo \\
        --precompute-ref                                 # 8 GPUs; add --resume to continue after a kill
    python dpo.py --estimate-memory --model Qwen2.5-7B-Instruct --world-size 8   # per-rank memory, allocates nothing

The data is the conversational preference JSONL that TRL reads, one pair a line, extra keys kept as metadata:
    {"prompt": [{"role": "user", "content": ...}], "chosen": [{"role": "assistant", "content": ...}],
     "rejected": [{"role": "assistant", "content": ...}], "question_id": ..., ...}
The training machinery (FSDP2 wrap, AdamW, warmup + cosine, checkpoints and resume, metrics log) is sft.py's.
"""
import functools
import gc
import hashlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model import ModelConfig, load_tokenizer, read_config
from sft import (add_training_args, all_reduce_sum, autocast, build_optimizer, check_batch_sizes, fit, get_rank,
                 init_distributed, load_checkpoint, load_model, prepare_model, resume_point, run_settings,
                 teardown_distributed)
from templates import (ArgumentParser, UserError, checked, encode_chat, lock_output, nonnegative_float, positive_float,
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
# Sequence log-probs. A batch holds B pairs as 2B rows, the chosen rows then the rejected rows, right-padded to one
# length T: tokens [2B, T], and mask [2B, T] True on the response tokens (targets, as encode_chat marks them).


def scored_positions(mask):
    """Position t predicts token t + 1, so the positions to score are those just before a response token."""
    return torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)


def sequence_logps(logits, tokens, mask):
    """log pi(response | prompt) per row [2B]: the SUM of log p(token) over the row's response tokens, in fp32.

    logits [n, V] are the model's at the n scored_positions(mask), row-major: model(tokens, logits_at=...) never
    runs the head on prompt and padding positions. fp32, because the loss sees a small difference of two sums over
    thousands of tokens and bf16 keeps 3 significant digits; logit[target] - logsumexp = log_softmax[target]
    without a second [n, V] tensor."""
    logits = logits.float()
    targets = tokens[:, 1:][mask[:, 1:]]
    token_logps = logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)
    rows = mask[:, 1:].nonzero()[:, 0]  # the row of each scored position, in the same row-major order
    return torch.zeros(len(tokens), device=logits.device).index_add(0, rows, token_logps)


def concatenated_forward(model, batch):
    """Chosen and rejected rows in ONE forward (one pass over the weights, which FSDP gathers once), split after.
    Right padding is harmless: under the causal mask no real token attends to a later pad. -> ([B], [B])."""
    tokens, mask = batch["tokens"], batch["mask"]
    logps = sequence_logps(model(tokens, logits_at=scored_positions(mask)), tokens, mask)
    return logps.chunk(2)


# ----------------------------------------------------------------------------------------------------------------
# Data: preference JSONL -> token ids. The prompt tokens are those of chat(prompt + [reply]) before the reply, so a
# pair shares them exactly; the reply is its content and <|im_end|>, all of them trained.


def as_messages(value, role, where):
    if isinstance(value, str):  # TRL's "standard" form: plain text, read here as one message of `role`
        return [{"role": role, "content": value}]
    if not (isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value)):
        raise ValueError(f"{where}: expected a string or a non-empty list of chat messages, got {str(value)[:80]!r}")
    return value


def encode_pair(tokenizer, record, where):
    """(prompt_ids, chosen_ids, rejected_ids) of one preference record."""
    prompt = as_messages(record.get("prompt"), "user", f"{where} prompt")
    if prompt[-1]["role"] == "assistant":
        raise ValueError(f"{where}: the prompt ends with an assistant turn; the reply must be in chosen/rejected")
    parts = []
    for key in ("chosen", "rejected"):
        reply = as_messages(record.get(key), "assistant", f"{where} {key}")
        if len(reply) != 1 or reply[0]["role"] != "assistant":
            raise ValueError(f"{where}: {key} must be one assistant message")
        ids, mask = encode_chat(tokenizer, prompt + reply)
        end = len(mask) - mask[::-1].index(True)  # the reply: the last run of trained tokens
        start = end - mask[:end][::-1].index(False) if False in mask[:end] else 0
        parts.append((ids[:start], ids[start:end]))  # the "\n" after <|im_end|> conditions nothing: dropped
    (prompt_ids, chosen_ids), (prompt_ids_r, rejected_ids) = parts
    assert prompt_ids == prompt_ids_r, f"{where}: chosen and rejected tokenize the prompt differently"
    return prompt_ids, chosen_ids, rejected_ids


def print0(*a):
    if get_rank() == 0:
        print(*a, flush=True)


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


def collate(examples, pad_id, device="cpu"):
    """One micro-batch: tokens and mask [2B, T], the B chosen rows then the B rejected rows, right-padded; the
    precomputed reference log-probs [2, B] if the examples carry them; "units" (pairs) and "n_tokens" for
    sft.train_step, which normalises the loss by the pairs of the whole step."""
    rows = [e["prompt"] + e[key] for key in ("chosen", "rejected") for e in examples]
    masks = [[False] * len(e["prompt"]) + [True] * len(e[key]) for key in ("chosen", "rejected") for e in examples]
    T = max(map(len, rows))
    batch = {"tokens": torch.tensor([r + [pad_id] * (T - len(r)) for r in rows], device=device),
             "mask": torch.tensor([m + [False] * (T - len(m)) for m in masks], device=device),
             "units": len(examples), "n_tokens": sum(map(len, rows))}
    if "ref_chosen" in examples[0]:
        batch["ref_logps"] = torch.tensor([[e["ref_chosen"] for e in examples],
                                           [e["ref_rejected"] for e in examples]], device=device)
    return batch


# ----------------------------------------------------------------------------------------------------------------
# Memory on paper: what one rank holds during a step, from the config's shapes alone.


def estimate_memory(cfg: ModelConfig, world_size, micro_batch, seq_len, precompute_ref=False, checkpointing=True):
    """{what: bytes per rank} for full DPO under FSDP2 with bf16 compute, fp32 master weights, grads and AdamW.

    Activations are counted per token and block in bf16 (norm outputs, q/k/v before and after RoPE, attention
    output, o_proj input, 4 MLP tensors of width I) plus the two fp32 copies RMSNorm keeps: about (10H + 5kv + 4I)
    x 2 bytes. FSDP2 keeps the root (embedding, final norm, head) gathered through the step, and prefetches the next
    block while one runs. Not counted: the CUDA context and NCCL buffers (1-3 GB), allocator fragmentation."""
    H, I, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * cfg.head_dim
    block = 2 * H * H + 2 * H * kv + H + 2 * kv + 3 * H * I + 2 * H  # q,o + k,v + biases + MLP + 2 norms
    root = V * H * (1 if cfg.tie_word_embeddings else 2) + H
    n_params, n = L * block + root, 2 * micro_batch * seq_len  # tokens per forward: chosen + rejected rows
    block_acts = n * (10 * H + 5 * kv + 4 * I) * 2
    return {
        "parameters (fp32, sharded)": 4 * n_params / world_size,
        "gradients (fp32, sharded)": 4 * n_params / world_size,
        "AdamW moments (2 x fp32, sharded)": 8 * n_params / world_size,
        "reference model (bf16, sharded)": 0 if precompute_ref else 2 * n_params / world_size,
        "gathered bf16 root + 2 blocks, with their grads": 2 * 2 * (root + 2 * block),
        "activations": L * n * H * 2 + block_acts if checkpointing else L * block_acts,
        "response logits (<= 2B x T x V): bf16, fp32, fp32 grad": n * V * (2 + 4 + 4),
        "n_params": n_params,
    }


def print_memory(cfg, world_size, micro_batch, seq_len):
    print(f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}; world {world_size}, "
          f"micro batch {micro_batch} pairs (= {2 * micro_batch} rows) x {seq_len} tokens. GiB per rank:\n")
    cases = [(False, False), (False, True), (True, True)]
    est = [estimate_memory(cfg, world_size, micro_batch, seq_len, p, c) for p, c in cases]
    print("| | " + " | ".join(f"{'precomputed' if p else 'live'} ref, {'ckpt' if c else 'no ckpt'}"
                            for p, c in cases) + " |")
    print("|---|" + "---|" * len(cases))
    for key in est[0]:
        if key != "n_params":
            print(f"| {key} | " + " | ".join(f"{e[key] / 2**30:.1f}" for e in est) + " |")
    totals = [sum(v for k, v in e.items() if k != "n_params") / 2**30 for e in est]
    print("| **total** | " + " | ".join(f"**{t:.1f}**" for t in totals) + " |")
    print(f"\n{est[0]['n_params'] / 1e9:.2f}B parameters; add 1-3 GiB for the CUDA context and NCCL buffers.")


# ----------------------------------------------------------------------------------------------------------------
# The reference model: frozen, eval mode, the policy's compute dtype, sharded like it. Or, with --precompute-ref, its
# log-probs for every pair, computed once (each rank a slice, then summed across ranks) and cached beside the data.


def load_reference(path, device, world_size, dtype):
    ref = prepare_model(load_model(path), device, world_size, dtype=dtype)  # no fp32 master copy: nothing trains
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
    """[2, N] fp32 reference log-probs (chosen, rejected) of every pair, from the cache file or computed now."""
    path = reference_cache_path(args, dtype, device)
    # All ranks must agree (a file appearing between their checks would leave some computing alone, deadlocked).
    if all_reduce_sum(torch.tensor(float(path.is_file()), device=device)) == world_size:
        print0(f"reference log-probs: {path}")
        return torch.load(path, weights_only=True)
    ref = load_reference(args.ref_model or args.model, device, world_size, dtype)
    logps = torch.zeros(2, len(examples), dtype=torch.float64, device=device)
    mine, bs = list(range(rank, len(examples), world_size)), args.precompute_batch
    n_batches = math.ceil(math.ceil(len(examples) / world_size) / bs)  # the same on every rank: FSDP needs lockstep
    for b in tqdm(range(n_batches), desc="reference log-probs", disable=rank != 0):
        idx = mine[b * bs:(b + 1) * bs]
        batch = collate([examples[i] for i in idx or [0]], pad_id, device)  # [0]: a dummy, discarded
        with autocast(device, torch.bfloat16):  # as in training: bf16 autocast on GPU, off on CPU
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


def preference_loss(model, batch, args, ref=None):
    """(sum over the micro-batch's pairs of the loss, {metric: sum}) for sft.train_step, which divides by the
    number of pairs in the whole optimizer step (all micro-batches, all ranks)."""
    chosen, rejected = concatenated_forward(model, batch)
    if ref is None:
        ref_chosen, ref_rejected = batch["ref_logps"]
    else:
        with torch.no_grad():
            ref_chosen, ref_rejected = concatenated_forward(ref, batch)
    n_tokens = batch["mask"][:, 1:].sum(-1).view(2, -1)  # response tokens of the chosen / rejected rows
    logps = torch.stack([chosen, rejected, ref_chosen, ref_rejected])
    if args.ipo:  # per-token means, as the IPO authors and TRL use them (see dpo_loss)
        logps = logps / n_tokens.repeat(2, 1)
    losses, chosen_rewards, rejected_rewards = dpo_loss(*logps, args.beta, args.label_smoothing, args.ipo)
    if args.rpo_alpha:  # Iterative RPO (Pang et al. 2024, eq. 3): + alpha * the chosen reply's NLL per token
        losses = losses - args.rpo_alpha * chosen / n_tokens[0]
    return losses.sum(), {
        "rewards/chosen": chosen_rewards.sum(), "rewards/rejected": rejected_rewards.sum(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
        "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
        "logps/chosen": chosen.detach().sum(), "logps/rejected": rejected.detach().sum()}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], conflict_handler="resolve")
    p.add_argument("--model", required=True, help="Hugging Face Qwen2 folder: the SFT model, policy and reference")
    p.add_argument("--ref-model", help="reference model folder, if not --model")
    p.add_argument("--tokenizer", help="folder with tokenizer.json, if not --model")
    p.add_argument("--data", help="preference pairs, JSONL (prompt / chosen / rejected)")
    p.add_argument("--beta", type=positive_float, default=0.3, help="KL strength (the authors' 0.3)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="conservative DPO: P(label flipped)")
    p.add_argument("--ipo", action="store_true", help="IPO loss instead of the sigmoid (beta = tau)")
    p.add_argument("--rpo-alpha", type=nonnegative_float, default=0.0,
                   help="weight of the chosen NLL term (Iterative RPO: 1)")
    p.add_argument("--truncate-rejected", action="store_true",
                   help="score each rejected reply only through the line where it first differs from its chosen")
    p.add_argument("--max-length", type=checked(int, 2), default=4096, help="prompt + reply tokens per sequence")
    p.add_argument("--max-prompt-length", type=positive_int, default=1024,
                   help="prompt tokens kept when cutting a pair")
    p.add_argument("--precompute-ref", action="store_true", help="reference log-probs once, then free the model")
    p.add_argument("--precompute-batch", type=positive_int, default=4, help="pairs per forward when precomputing")
    p.add_argument("--estimate-memory", action="store_true",
                   help="print per-rank memory for --model (a folder or a config.json); needs no --data/--out")
    p.add_argument("--world-size", type=positive_int, default=8, help="ranks, for --estimate-memory")
    # Full fine-tuning wants a far smaller lr than the authors' LoRA 1e-5; 64 pairs = 8 ranks x 8 micro-batches.
    add_training_args(p, lr=5e-7, batch_size=64, epochs=1, micro_batch_size=1, save_every=100)
    # sft's --out is required; here it is not, for --estimate-memory (conflict_handler="resolve" replaces it).
    p.add_argument("--out", help="run folder: checkpoints step-NNNNNN/, final -> the last, metrics.jsonl")
    args = p.parse_args(argv)
    if not args.estimate_memory and not (args.data and args.out):
        p.error("--data and --out are required (unless --estimate-memory)")
    if not 0 < args.max_prompt_length < args.max_length:
        p.error("need 0 < --max-prompt-length < --max-length")
    if not 0 <= args.label_smoothing < 0.5:
        p.error("--label-smoothing must be in [0, 0.5)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.estimate_memory:
        cfg = ModelConfig.from_hf(read_config(args.model))
        return print_memory(cfg, args.world_size, args.micro_batch_size, args.max_length)
    rank, world_size, device = init_distributed()
    if rank == 0:  # one run per folder: a second one (or an orphan of a killed one) would interleave checkpoints
        Path(args.out).mkdir(parents=True, exist_ok=True)
        lock_output(args.out)
    check_batch_sizes(args, world_size)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    pad_id = special_ids(tokenizer)["endoftext"]  # any id: padding is masked and after every real token
    examples, counts = load_pairs(args.data, tokenizer, args.max_length, args.max_prompt_length,
                                  args.truncate_rejected)
    print0(f"{args.data}: {json.dumps(counts)}")
    # Resuming needs the same pairs, loss and reference too (the reference path: a resumed policy loads from the
    # checkpoint, the reference from --ref-model / --model).
    settings = run_settings(args, examples, beta=args.beta, label_smoothing=args.label_smoothing, ipo=args.ipo,
                            rpo_alpha=args.rpo_alpha, reference=str(Path(args.ref_model or args.model).resolve()))
    checkpoint, start_step = resume_point(args, examples, settings)
    dtype = getattr(torch, args.dtype)
    mixed_precision = device.type == "cuda" and dtype == torch.bfloat16
    # The reference computes exactly as the policy does: FSDP mixed precision gathers the policy's fp32 weights as
    # bf16, so a sharded reference is stored bf16; unsharded, the policy's weights stay fp32 (under bf16 autocast
    # on GPU), and so do the reference's. Otherwise step 0 would not give ln 2.
    ref_dtype = torch.bfloat16 if mixed_precision and world_size > 1 else torch.float32
    ref = None
    if args.precompute_ref:
        ref_logps = precompute_reference(args, examples, pad_id, rank, world_size, device, ref_dtype)
        for e, (chosen, rejected) in zip(examples, ref_logps.T.tolist()):
            e["ref_chosen"], e["ref_rejected"] = chosen, rejected
    else:
        ref = load_reference(args.ref_model or args.model, device, world_size, ref_dtype)

    policy = prepare_model(load_model(checkpoint or args.model), device, world_size, mixed_precision=mixed_precision,
                           activation_checkpointing=args.activation_checkpointing)
    optimizer = build_optimizer(policy, args.lr, args.weight_decay)
    if checkpoint:
        load_checkpoint(checkpoint, policy, optimizer)
        print0(f"resumed from {checkpoint} (step {start_step})")
    collate_fn = functools.partial(collate, pad_id=pad_id, device=device)
    loss_fn = functools.partial(preference_loss, args=args, ref=ref)
    fit(args, policy, optimizer, examples, collate_fn, loss_fn, device, start_step, desc="dpo", info=counts,
        bar_keys=("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"),
        length=lambda e: len(e["prompt"]) + max(len(e["chosen"]), len(e["rejected"])), settings=settings)
    teardown_distributed()


if __name__ == "__main__":
    run_main(main)
