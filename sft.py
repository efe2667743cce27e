"""
sft.py: Stage 1 of MedCritical (Su et al., arXiv 2509.23368), supervised fine-tuning of the student on the teacher's
verified long chain-of-thought answers; below it, the training machinery dpo.py (Stage 2) shares.

    L = sum_{examples e of the step} sum_{t : mask_e[t]} -log p(x_e[t] | x_e[<t]) / N

over the trained tokens (each assistant reply and its <|im_end|>; every token of a {"text"} record), with N the
trained tokens of the WHOLE optimizer step (all micro-batches, all ranks): accumulation and GPU count leave L unchanged.

    python sft.py --model Qwen2.5-0.5B-Instruct --data sft.jsonl --out runs/sft-0.5b        # one process
    torchrun --nproc-per-node 8 sft.py --model Qwen2.5-7B-Instruct --data sft.jsonl --out runs/sft   # [--resume]
    python sft.py --init-config tiny.json --tokenizer tok/ --data text.jsonl --out runs/pre   # random init
    python sft.py --model Qwen2.5-7B-Instruct --data sft.jsonl --out runs/sft-lora --lora-rank 8   # LoRA, 1 GPU
"""
import argparse
import functools
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import time
import warnings
from collections import Counter
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from tqdm import tqdm

from model import (LORA_TARGETS, LoRAConfig, ModelConfig, Transformer, add_lora, copy_tokenizer, init_weights, load,
                   load_adapter, load_tokenizer, read_config, save, save_adapter)
from templates import (ArgumentParser, UserError, checked, die_with_parent, encode_chat, lock_output,
                       nonnegative_float, nonnegative_int, positive_float, positive_int, run_main, special_ids)

# DCP saves/loads fine in one process without a process group; it just says so on every call.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

# ----------------------------------------------------------------------------------------------------------------
# Stage 1 data and loss. JSONL of {"messages": [...]} (`templates.py distill`; TRL's conversational format),
# {"prompt": [...], "completion": [...]} (TRL's prompt-completion) or {"text": "..."}. An example is (ids, mask),
# mask[t] True where ids[t] is trained (encode_chat's mask, unshifted); dpo.py's rows follow the same convention.


def tokenize_records(path, tokenizer, max_len, verbose=True):
    """-> (examples [(ids, mask)], counts). A chat longer than max_len loses prompt tokens from the LEFT (the answer
    is what we train on); one whose answer alone does not fit is skipped. Text longer than max_len is cut into
    windows overlapping by one token, so every token is still a target exactly once. Bad records are skipped,
    counted, and the first few reported by line (if verbose: rank 0)."""
    eos = special_ids(tokenizer)["endoftext"]
    examples, counts = [], Counter()
    if not Path(path).is_file():
        raise UserError(f"{path}: no such data file")

    def skip(lineno, reason):
        counts["skipped: " + reason] += 1
        if verbose and sum(v for k, v in counts.items() if k.startswith("skipped")) <= 5:
            print(f"{path}:{lineno}: skipped ({reason})")

    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for lineno, line in enumerate(tqdm(lines, desc="tokenize", disable=not verbose), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skip(lineno, "not JSON")
            continue
        record = record if isinstance(record, dict) else {}
        if isinstance(record.get("text"), str):
            if not record["text"]:
                skip(lineno, "empty text")
                continue
            ids = tokenizer.encode(record["text"], add_special_tokens=False).ids + [eos]
            for start in range(0, len(ids) - 1, max_len - 1):
                window = ids[start:start + max_len]
                examples.append((window, [True] * len(window)))
                counts["text windows"] += 1
            continue
        if isinstance(record.get("prompt"), list) and isinstance(record.get("completion"), list):
            messages = record["prompt"] + record["completion"]
        elif isinstance(record.get("messages"), list):
            messages = record["messages"]
        else:
            skip(lineno, "no messages, prompt/completion lists or text")
            continue
        try:
            ids, mask = encode_chat(tokenizer, messages)
        except (ValueError, KeyError, TypeError) as e:
            skip(lineno, f"bad messages: {type(e).__name__}")
            continue
        if not any(mask):
            skip(lineno, "no assistant message")
            continue
        if len(ids) > max_len:
            if len(ids) - mask.index(True) > max_len - 1:  # keep >= 1 prompt token to predict the first answer token
                skip(lineno, "answer longer than max_len")
                continue
            ids, mask = ids[len(ids) - max_len:], mask[len(ids) - max_len:]
            counts["prompt truncated (left)"] += 1
        examples.append((ids, mask))
        counts["chats"] += 1
    return examples, dict(counts)


def collate_rows(examples, pad_id, device):
    """(ids, mask) examples -> right-padded "tokens" and "mask" [B, T], "units" (trained tokens, train_step's divisor)
    and "n_tokens" (input tokens). No attention mask is needed: padding comes after every real token, so causal
    attention never lets a real token see it."""
    width = max(len(ids) for ids, _ in examples)
    tokens = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in examples], device=device)
    mask = torch.tensor([m + [False] * (width - len(m)) for _, m in examples], device=device)
    return {"tokens": tokens, "mask": mask, "units": int(mask[:, 1:].sum()),
            "n_tokens": sum(len(ids) - 1 for ids, _ in examples)}


def next_token_targets(tokens, mask):
    """(inputs, at, targets) for Transformer.forward: input position t predicts token t + 1, so the model reads
    tokens[:, :-1] and is scored at `at` = mask[:, 1:], on the targets tokens[:, 1:][at] ([n], row-major)."""
    at = mask[:, 1:]
    return tokens[:, :-1], at, tokens[:, 1:][at]


def target_logps(model, tokens, mask):
    """log p(tokens[b, t] | tokens[b, <t]) at every trained token (mask[b, t]), [n] in fp32, row-major. The head runs
    on those positions only, in chunks (model.token_logps): never [n, V] logits whole."""
    inputs, at, targets = next_token_targets(tokens, mask)
    return model(inputs, logits_at=at, targets=targets)


def sft_loss(model, batch):
    """Summed next-token cross-entropy over the micro-batch's trained tokens (train_step divides by the step's)."""
    return -target_logps(model, batch["tokens"], batch["mask"]).sum(), {}


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="Hugging Face Qwen2 folder to fine-tune")
    parser.add_argument("--init-config", help="config.json of a model to train from random init (instead of --model)")
    parser.add_argument("--tokenizer", help="folder with tokenizer.json, if not --model")
    parser.add_argument("--data", required=True, help="JSONL of {messages}, {prompt, completion} or {text}")
    parser.add_argument("--max-len", type=checked(int, 2), default=8192,
                        help="max tokens per example (prompt + answer)")
    add_training_args(parser, lr=1e-5, batch_size=32, epochs=3)
    args = parser.parse_args(argv)
    if (args.model is None) == (args.init_config is None):
        parser.error("give exactly one of --model or --init-config")
    if args.tokenizer is None and args.model is None:
        parser.error("--init-config needs --tokenizer")

    rank, _, device = start_run(args)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    examples, counts = tokenize_records(args.data, tokenizer, args.max_len, verbose=rank == 0)
    if not examples:
        raise UserError(f"{args.data}: no usable example ({counts})")
    print0(f"{args.data}: {len(examples)} examples, {json.dumps(counts)}")
    top = max(max(ids) for ids, _ in examples)
    vocab = read_config(args.init_config or args.model).get("vocab_size", ModelConfig.vocab_size)
    if top >= vocab:
        raise UserError(f"token ids reach {top} but the model's vocab is {vocab}")
    checkpoint, start_step, settings = resume_point(args, examples)
    collate = functools.partial(collate_rows, pad_id=special_ids(tokenizer)["endoftext"], device=device)
    fit(args, examples, collate, sft_loss, device, checkpoint, start_step, settings, desc="sft", info=counts,
        length=lambda example: len(example[0]))


# ----------------------------------------------------------------------------------------------------------------
# The training machinery, shared with dpo.py. One code path for 1 or N processes (under torchrun: RANK, WORLD_SIZE,
# LOCAL_RANK set), CPU (gloo) or GPU (nccl): FSDP2 shards each decoder block then the root, fp32 master weights,
# bf16 compute on GPU. With --lora-rank the base is frozen in the compute dtype and only fp32 adapters train.

_slow_group = None  # a gloo group with a long timeout, for the ranks that wait while rank 0 writes a checkpoint


def init_distributed():
    """-> (rank, world_size, device). nccl on CUDA, gloo on CPU; a plain single process without torchrun."""
    global _slow_group
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    die_with_parent()  # a killed torchrun must not leave its workers training on as orphans
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    _slow_group = dist.new_group(backend="gloo", timeout=timedelta(hours=2))
    return dist.get_rank(), dist.get_world_size(), device


def start_run(args):
    """Join the other processes, lock --out, check the batch sizes, seed this rank. -> (rank, world_size, device)."""
    rank, world_size, device = init_distributed()
    if rank == 0:  # one run per folder: a second one (or an orphan of a killed one) would interleave checkpoints
        Path(args.out).mkdir(parents=True, exist_ok=True)
        lock_output(args.out)
    if args.batch_size % (world_size * args.micro_batch_size):
        raise UserError(f"--batch-size {args.batch_size} must be a multiple of world size {world_size} x "
                        f"--micro-batch-size {args.micro_batch_size} (every rank runs the same micro-batches)")
    seed_all(args.seed + rank)  # LoRA's A is drawn on rank 0 (and broadcast): the same on 1 or N ranks
    return rank, world_size, device


def seed_all(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def teardown_distributed():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def print0(*a):
    if get_rank() == 0:
        print(*a, flush=True)


def barrier(slow=False):
    """All ranks meet. slow=True: on a CPU (gloo) group whose timeout is 2 hours, not NCCL's 10 minutes, for
    waiting on one rank's long file write (a 15 GB checkpoint on slow storage)."""
    if dist.is_initialized():
        dist.barrier(group=_slow_group if slow else None)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def autocast(device, dtype):
    """bf16 autocast where the device has bf16 matmuls (GPU); on CPU training stays fp32 (exact, and CPU bf16 is
    slow). Under FSDP mixed precision the gathered weights are already bf16; autocast covers the rest."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and dtype == torch.bfloat16)


def load_model(path, init_config=None, seed=0) -> Transformer:
    """The model as prepare_model wants it: real weights on CPU on rank 0 (a Hugging Face folder, or random init
    from `init_config`, a config.json), an empty meta-device model on every other rank (filled in prepare_model)."""
    hf = read_config(init_config or path)
    try:
        cfg = ModelConfig.from_hf(hf)
    except UserError as e:
        raise UserError(f"{init_config or Path(path) / 'config.json'}: {e}") from None
    if get_rank() != 0:
        with torch.device("meta"):
            return Transformer(cfg)
    if init_config:
        return init_weights(Transformer(cfg), seed=seed)
    # Read in the stored dtype (bf16 for Qwen releases: 15 GB, not 30, of host memory on rank 0).
    stored = hf.get("torch_dtype") or hf.get("dtype")
    return load(path, dtype=getattr(torch, stored) if stored in ("bfloat16", "float16") else torch.float32)


def shard_model(model: Transformer, mesh=None, mixed_precision: bool = False):
    """FSDP2's manual wrap: each decoder block its own unit, then the root (embedding, final norm, head). A block's
    parameters are all-gathered just before it runs and freed after, so a rank holds 1/world of the model plus one
    block. mixed_precision (GPU): gathered and computed in bf16, the sharded master copy, the gradients'
    reduce-scatter and the optimizer in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    kwargs = {"mesh": mesh}
    if mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def prepare_model(model, device, world_size, dtype=torch.float32, mixed_precision=False,
                  activation_checkpointing=False, lora=None, adapter=None) -> Transformer:
    """The model ready to train on `device` (a new object when sharded): parameters in `dtype`, shard_model when
    world_size > 1, optional activation checkpointing. With `lora` (a LoRAConfig) the base is frozen in `dtype`
    and fp32 adapters are added, filled from the PEFT folder `adapter` (a resume), else freshly drawn on rank 0."""
    if lora is not None and get_rank() == 0:
        model = add_lora(model.to(dtype), lora)  # the base cast first: the adapters stay fp32
        if adapter:
            load_adapter(model, adapter)
    if world_size == 1:
        model = model.to(device=device, dtype=None if lora else dtype)
    else:
        # Shard an empty meta-device copy (so no rank allocates the full model), allocate only the local shards,
        # then fill them from rank 0's weights. to_empty keeps tied embeddings tied (load_state_dict(assign=True)
        # would not), and FSDP2 must see the tie when it shards the root.
        full_state, training = (model.state_dict() if get_rank() == 0 else {}), model.training
        with torch.device("meta"):
            model = Transformer(model.config).to(dtype).train(training)
            if lora is not None:
                add_lora(model, lora)
        shard_model(model, mixed_precision=mixed_precision)
        model.to_empty(device=device)
        # Rank 0 broadcasts each full tensor, every rank keeps its shard (full_state is converted in place).
        set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True,
                                                                         broadcast_from_rank0=True))
    model.activation_checkpointing = activation_checkpointing
    return model


def build_optimizer(model, lr, weight_decay=0.0, betas=(0.9, 0.95)):
    """AdamW over the trainable parameters, built AFTER sharding (it must hold the local shards). No weight decay
    on 1-D parameters: biases and RMSNorm weights (decaying a norm's gain toward 0 shrinks the activations)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def lr_at(step, total_steps, warmup_steps, peak_lr, min_lr_ratio=0.1):
    """Learning rate of 0-based `step`: linear warmup to peak_lr over warmup_steps (the first step is not lr 0),
    then cosine decay to peak_lr * min_lr_ratio at the last step."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps)
    return peak_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# Checkpoints: out/step-000100/ = a Hugging Face model folder (+ adapter/ in PEFT's format with LoRA; the weights
# merged) + optimizer/ (DCP shards of the fp32 master weights and AdamW) + rng-rank{r}.pt + trainer_state.json.
# Written to out/.tmp-step-000100/ and renamed when complete, so a kill mid-save leaves only a .tmp folder that
# resume ignores (and the next save of that step replaces). Every rank writes into the one folder: on several
# nodes, --out must be on a shared filesystem.

CHECKPOINT = re.compile(r"step-(\d+)")


def save_dtype(choice, compute_dtype, device, source_config) -> torch.dtype:
    """The dtype a checkpoint's weights are written in (what vLLM then serves with --dtype auto): `choice`, or for
    "auto" bf16 when training computes in bf16 (GPU), else the source checkpoint's if 16-bit (Qwen2.5 ships bf16),
    else fp32. A checkpoint is then the size of its release (15.2 GB for 7B, not 30.5), and a bf16 model is never
    served in fp16 (vLLM's choice for an fp32 checkpoint). The fp32 master weights live on in the resume state."""
    if choice != "auto":
        return getattr(torch, choice)
    if torch.device(device).type == "cuda" and compute_dtype == torch.bfloat16:
        return torch.bfloat16
    hf = json.loads(Path(source_config).read_text()) if Path(source_config).is_file() else {}
    stored = hf.get("dtype") or hf.get("torch_dtype")
    return getattr(torch, stored) if stored in ("bfloat16", "float16") else torch.float32


def save_checkpoint(out_dir, step, model, optimizer, extra=None, keep=2, tokenizer=None, dtype=None):
    """Save everything needed to continue after optimizer step `step` (collective: every rank calls it): the
    Hugging Face folder in `dtype` (default: the parameters'), the tokenizer files from `tokenizer` (a folder or
    tokenizer.json) so the folder loads on its own, and the resume state (fp32 master weights, AdamW, RNG)."""
    out_dir, rank = Path(out_dir), get_rank()
    final, tmp = out_dir / f"step-{step:06d}", out_dir / f".tmp-step-{step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    # The collectives first. The full weights, gathered to rank 0's CPU one tensor at a time (never a full copy
    # on a GPU); the resume state sharded, each rank writing its own part (DCP can reload it on another world size).
    full_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    dcp.save({"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)},
             checkpoint_id=tmp / "optimizer")
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    torch.save(rng, tmp / f"rng-rank{rank}.pt")
    # Then rank 0 writes the Hugging Face folder with no collective in flight, while the others wait on a barrier
    # whose timeout allows a slow disk (inside NCCL's collectives they would time out after 10 minutes).
    if rank == 0:
        save(model, tmp, state_dict=full_state, dtype=dtype)  # a LoRA model: merged (save() merges)
        if getattr(model, "lora", None):
            save_adapter(model, tmp / "adapter", state_dict=full_state)
        if tokenizer:
            copy_tokenizer(tokenizer, tmp)
    del full_state
    barrier(slow=True)
    if rank == 0:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": get_world_size(),
                                                            **(extra or {})}, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)  # an identical step saved by an earlier, interrupted run
        os.replace(tmp, final)  # atomic: the folder name appears only when everything is written
        for old in latest_checkpoints(out_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    barrier()
    return final


def latest_checkpoints(out_dir):
    """Complete checkpoints in out_dir, oldest first."""
    found = [p for p in Path(out_dir).glob("step-*") if CHECKPOINT.fullmatch(p.name)
             and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT.fullmatch(p.name).group(1)))


def load_checkpoint(path, model, optimizer):
    """Restore the fp32 master weights, the optimizer and this rank's RNG states from a checkpoint folder; returns
    its trainer state. Build `model` from the folder first (load_model(path)): its weights, which may be bf16, are
    then replaced by the exact ones."""
    path = Path(path)
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=path / "optimizer")
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    rng_file = path / f"rng-rank{get_rank()}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=False)  # our own file: numpy/python states are pickled
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    else:
        print(f"warning: {rng_file} missing (resumed on more ranks than saved); this rank's RNG is not restored")
    return json.loads((path / "trainer_state.json").read_text())


RESULT_ARGS = ("batch_size", "seed", "lr", "min_lr_ratio", "warmup", "weight_decay", "grad_clip", "dtype")


def resume_point(args, examples, **extra):
    """(checkpoint folder or None, its step, settings). The settings are what a resumed run must share with the
    checkpoint it continues, or it would be another run: the tokenized examples (their sha256: another data file of
    the same length, another tokenizer or max length all differ), the data order, the optimizer and schedule, and
    `extra` (dpo.py: the loss and the reference); --steps only where the schedule depends on it (a constant-lr run
    may be extended). Refuses other settings, and a fresh run into a folder of checkpoints (it would mix two runs)."""
    constant_lr = args.warmup == 0 and args.min_lr_ratio == 1
    settings = {"data_sha256": hashlib.sha256(pickle.dumps(examples, protocol=4)).hexdigest()[:16],
                "examples": len(examples), **{k: getattr(args, k) for k in RESULT_ARGS},
                "steps": None if constant_lr else total_steps(args, len(examples)), **extra}
    found = latest_checkpoints(args.out)
    if found and not args.resume:
        raise UserError(f"{args.out} holds checkpoints (last: {found[-1].name}): pass --resume to continue "
                        "that run, or choose another --out")
    if not found:
        if args.resume:
            print0(f"--resume: no complete checkpoint in {args.out}; starting from step 0")
        return None, 0, settings
    state = json.loads((found[-1] / "trainer_state.json").read_text())
    old = state.get("settings") or {k: state.get(k) for k in ("examples", "batch_size", "seed")}  # older runs
    differ = {k: (v, settings.get(k)) for k, v in old.items() if v != settings.get(k)}
    if differ:
        raise UserError(f"{found[-1]} was made with other data or settings, (then, now): {differ}; the saved data "
                        "position and schedule would not match: pass the same ones, or choose another --out")
    return found[-1], state["step"], settings


class MetricsLog:
    """metrics.jsonl, one record per step (rank 0). A run starting at step k > 0 (a resume) keeps the records up to
    k and drops later ones (written by the killed run, about to be redone); a run starting at 0 starts a new file."""

    def __init__(self, path, start_step=0, enabled=True):
        self.path, self.enabled = Path(path), enabled
        if enabled and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if start_step and line.strip() and json.loads(line).get("step", -1) <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, **record):
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def train_step(model, optimizer, micro_batches, loss_fn, lr, grad_clip, device, dtype=torch.float32):
    """One optimizer step: accumulate over this rank's micro-batches, clip, step. Each micro-batch has "units"
    (trained tokens for SFT, pairs for DPO) and "n_tokens", plus what loss_fn(model, batch) reads; loss_fn returns
    (the SUM of its unit losses, {name: summed metric}), 0-d tensors. Returns the step's metrics, each summed over
    all ranks and divided by the units of the whole step."""
    world_size = get_world_size()
    counts = torch.tensor([sum(b["units"] for b in micro_batches), sum(b["n_tokens"] for b in micro_batches)],
                          dtype=torch.float64, device=device)
    total_units, total_tokens = all_reduce_sum(counts).tolist()
    # We want grad = d/dw [sum over all ranks' unit losses] / total_units. FSDP's reduce-scatter (like DDP's
    # all-reduce) AVERAGES gradients over ranks, i.e. divides the sum of the ranks' gradients by world_size; so each
    # rank back-propagates world_size * (its loss sum) / total_units, and the average restores the exact global
    # mean however unevenly the units fall across micro-batches and ranks. (1 rank: plain sum / total_units.)
    scale = world_size / total_units
    for group in optimizer.param_groups:
        group["lr"] = lr
    sums = 0
    for batch in micro_batches:
        with autocast(device, dtype):
            loss_sum, metric_sums = loss_fn(model, batch)
        (loss_sum * scale).backward()
        sums = sums + torch.stack([loss_sum, *metric_sums.values()]).detach().double()
    # clip_grad_norm_ on FSDP2's DTensor gradients computes the global norm across shards.
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    finite = bool(torch.isfinite(grad_norm))
    if finite:  # a nan/inf gradient would poison the weights and AdamW's moments for good: skip this update
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sums = (all_reduce_sum(sums) / total_units).tolist()
    return {**dict(zip(["loss", *metric_sums], sums)), "lr": lr, "grad_norm": float(grad_norm),
            "skipped": not finite, "units": int(total_units), "tokens": int(total_tokens)}


# Data order: one infinite stream of per-epoch seeded permutations, cut into global batches. Step s uses stream
# positions [s*B, (s+1)*B): every batch is full, no example is dropped, and the position is just the step number.
# Within a step the batch is sorted by length and dealt to the ranks in turn, so each micro-batch holds examples of
# similar length (little padding: long CoTs and short answers mix) and the ranks get similar work. The step's loss
# is a sum over the same examples whichever rank or micro-batch holds them, so 1 and N processes still train on
# the same batches and compute the same update.


@functools.lru_cache(maxsize=4)
def epoch_order(seed, epoch, n_examples):
    return np.random.default_rng([seed, epoch]).permutation(n_examples)


def batch_indices(step, n_examples, batch_size, seed, rank=0, world_size=1, lengths=None):
    """Indices of the examples rank `rank` trains on in step `step` (batch_size is the global batch), shortest
    first when `lengths` (tokens per example) is given."""
    out = [int(epoch_order(seed, pos // n_examples, n_examples)[pos % n_examples])
           for pos in range(step * batch_size, (step + 1) * batch_size)]
    if lengths is not None:
        out.sort(key=lambda i: lengths[i])  # stable: equal lengths keep the permutation's order
    return out[rank::world_size]


def total_steps(args, n_examples):
    return args.steps if args.steps else math.ceil(args.epochs * n_examples / args.batch_size)


def trainable_model(args, device, world_size, checkpoint=None):
    """The model to train and its AdamW: from --model (or --init-config), prepared (sharded), and restored exactly
    (fp32 master weights, AdamW, RNG) from `checkpoint` when resuming."""
    dtype, lora = getattr(torch, args.dtype), None
    if args.lora_rank:
        lora = LoRAConfig(args.lora_rank, args.lora_alpha or 2.0 * args.lora_rank, args.lora_dropout,
                          tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()))
    # A LoRA checkpoint's weights are merged; its resume rebuilds the base + the checkpoint's adapter instead.
    model = load_model(checkpoint, seed=args.seed) if checkpoint and not lora else \
        load_model(args.model, getattr(args, "init_config", None), seed=args.seed)  # dpo.py has no --init-config
    # Parameters: fp32 master weights to train; with LoRA the frozen base in the compute dtype (bf16 on GPU).
    model = prepare_model(model, device, world_size, dtype if lora and device.type == "cuda" else torch.float32,
                          mixed_precision=device.type == "cuda" and dtype == torch.bfloat16,
                          activation_checkpointing=args.activation_checkpointing, lora=lora,
                          adapter=checkpoint / "adapter" if lora and checkpoint else None)
    optimizer = build_optimizer(model, args.lr, args.weight_decay)
    if checkpoint:
        step = load_checkpoint(checkpoint, model, optimizer)["step"]
        print0(f"resumed from {checkpoint} (step {step})")
    return model, optimizer


def fit(args, examples, collate, loss_fn, device, checkpoint, start_step, settings, desc="train", info=None,
        bar_keys=(), length=None):
    """The rest of a run (after resume_point): train from start_step to the last step, with a checkpoint every
    args.save_every steps and at the end (out/final points to the last); then the process group ends. `info` goes
    into the metrics file's start record, `bar_keys` (metric names) onto the progress bar, and `length(example)`
    (padded tokens it costs) groups each step's examples into micro-batches."""
    rank, world_size = get_rank(), get_world_size()
    steps, dtype = total_steps(args, len(examples)), getattr(torch, args.dtype)
    if dist.is_initialized():  # ranks that disagree on the data (a file changing under them) would deadlock
        sizes = torch.tensor([len(examples), -len(examples)], device=device)
        dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
        if sizes.tolist() != [len(examples), -len(examples)]:
            raise RuntimeError(f"ranks hold between {-sizes[1]} and {sizes[0]} examples; they must agree")
    model, optimizer = trainable_model(args, device, world_size, checkpoint)
    warmup_steps = round(args.warmup * steps)
    # Saved with each checkpoint and checked on resume: the data position (= step) only means something for the
    # same examples, batch size and seed.
    data_state = {"examples": len(examples), "batch_size": args.batch_size, "seed": args.seed, "steps": steps}
    source = getattr(args, "init_config", None) or Path(args.model) / "config.json"
    weights_dtype = save_dtype(args.save_dtype, dtype, device, source)
    metrics = MetricsLog(Path(args.out) / "metrics.jsonl", start_step, rank == 0)
    metrics.write(event="start", step=start_step, world_size=world_size, **data_state, **(info or {}))
    bar = tqdm(total=steps, initial=start_step, desc=desc, disable=rank != 0, dynamic_ncols=True)
    model.train()
    clock = time.perf_counter()
    lengths = [length(example) for example in examples] if length else None
    for step in range(start_step, steps):
        idx = batch_indices(step, len(examples), args.batch_size, args.seed, rank, world_size, lengths)
        mb = args.micro_batch_size
        micro_batches = [collate([examples[i] for i in idx[j:j + mb]]) for j in range(0, len(idx), mb)]
        lr = lr_at(step, steps, warmup_steps, args.lr, args.min_lr_ratio)
        stats = train_step(model, optimizer, micro_batches, loss_fn, lr, args.grad_clip, device, dtype)
        stats.update(step=step + 1, epoch=(step + 1) * args.batch_size / len(examples),
                     tokens_per_s=stats["tokens"] / (time.perf_counter() - clock))
        metrics.write(**stats)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", **{k: f"{stats[k]:.3f}" for k in bar_keys},
                        lr=f"{lr:.2e}", tok_s=f"{stats['tokens_per_s']:.0f}", gnorm=f"{stats['grad_norm']:.2f}")
        bar.update()
        if (step + 1) % args.save_every == 0 or step + 1 == steps:
            path = save_checkpoint(args.out, step + 1, model, optimizer, {**data_state, "settings": settings},
                                   keep=args.keep, tokenizer=args.tokenizer or args.model, dtype=weights_dtype)
            if rank == 0:
                bar.write(f"saved {path}")
        clock = time.perf_counter()
    bar.close()
    final, link = Path(args.out) / "final", Path(args.out) / ".final-link"
    if rank == 0 and final.is_dir() and not final.is_symlink():
        print(f"warning: {final} is a folder, not our link; the last checkpoint is step-{steps:06d}")
    elif rank == 0:  # out/final -> the last checkpoint, a stable name for the next stage (swapped atomically)
        link.unlink(missing_ok=True)
        link.symlink_to(f"step-{steps:06d}", target_is_directory=True)
        os.replace(link, final)
    teardown_distributed()


def add_training_args(parser, lr, batch_size, epochs, micro_batch_size=1, save_every=50, require_out=True):
    """The flags sft.py and dpo.py share (each with its own defaults)."""
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    fraction = checked(float, 0, 1)
    parser.add_argument("--out", required=require_out, help="run folder: checkpoints step-NNNNNN/ and metrics.jsonl")
    parser.add_argument("--epochs", type=positive_float, default=epochs, help="passes over the data (unless --steps)")
    parser.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (overrides --epochs)")
    parser.add_argument("--batch-size", type=positive_int, default=batch_size, help="global batch, summed over ranks")
    parser.add_argument("--micro-batch-size", type=positive_int, default=micro_batch_size, help="per rank per forward")
    parser.add_argument("--lr", type=positive_float, default=lr, help="peak learning rate")
    parser.add_argument("--min-lr-ratio", type=fraction, default=0.1, help="final lr = lr * this (cosine decay)")
    parser.add_argument("--warmup", type=fraction, default=0.05, help="linear warmup, as a fraction of the steps")
    parser.add_argument("--weight-decay", type=nonnegative_float, default=0.0, help="AdamW's, on matrices only")
    parser.add_argument("--grad-clip", type=nonnegative_float, default=1.0, help="max global grad norm (0: none)")
    parser.add_argument("--save-every", type=positive_int, default=save_every, help="checkpoint every N steps + last")
    parser.add_argument("--keep", type=nonnegative_int, default=2, help="complete checkpoints kept (0: all)")
    parser.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in --out")
    parser.add_argument("--seed", type=int, default=0, help="data order (and random init)")
    parser.add_argument("--dtype", default="bfloat16" if bf16 else "float32", choices=["bfloat16", "float32"],
                        help="compute dtype on GPU (CPU computes in fp32; master weights and AdamW are fp32, a "
                        "frozen LoRA base is stored in this dtype)")
    parser.add_argument("--save-dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                        help="saved weights; auto: bf16 if training computes in bf16, else the source's 16-bit dtype "
                        "if it has one, else fp32")
    parser.add_argument("--lora-rank", type=nonnegative_int, default=0,
                        help="train LoRA adapters of this rank on a frozen base (0: full fine-tuning)")
    parser.add_argument("--lora-alpha", type=positive_float, default=None,
                        help="LoRA scale alpha / rank (default 2 x rank)")
    parser.add_argument("--lora-dropout", type=checked(float, 0, 1), default=0.0, help="dropout on the LoRA input")
    parser.add_argument("--lora-targets", default=",".join(LORA_TARGETS), help="layers of each block with adapters")
    parser.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction,
                        default=torch.cuda.is_available(),
                        help="recompute each block in backward (a 7B model at 8k tokens needs it on 80 GB)")


if __name__ == "__main__":
    run_main(main)
