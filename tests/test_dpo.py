"""dpo.py: the loss against float64 math and TRL, sequence log-probs by hand, data, memory, and short training runs
(1 vs 2 processes, resume, precomputed reference) on a tiny Qwen2-shaped model with a tiny byte-level BPE."""
import collections
import json
import math
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

import dpo
from model import ModelConfig, Transformer, init_weights, load, save
from templates import chat, encode_chat, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
FINDINGS = "发热咳嗽胸痛头痛腹泻皮疹黄疸水肿乏力心悸"
DISEASES = "肺炎胃炎肝炎肾炎心衰贫血"


def pair_record(i):
    """A preference record in TRL's conversational form; the chosen reply names the right disease."""
    f1, f2 = FINDINGS[i % 10], FINDINGS[(3 * i + 1) % 10]
    right, wrong = DISEASES[2 * (i % 6):2 * (i % 6) + 2], DISEASES[2 * ((i + 2) % 6):2 * ((i + 2) % 6) + 2]
    return {"prompt": [{"role": "user", "content": f"病例{i}：{f1}、{f2}。诊断？"}],
            "chosen": [{"role": "assistant", "content": f"<think>\n{f1}{f2}提示{right}\n</think>\n答案：{right}"}],
            "rejected": [{"role": "assistant", "content": f"答案：{wrong}"}],
            "question_id": i, "round": 1}


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A checkpoint folder (tiny model + tokenizer.json) and 24 pairs on disk."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    d = tmp_path_factory.mktemp("dpo")
    records = [pair_record(i) for i in range(24)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([chat(r["prompt"] + r[k], False) for r in records for k in ("chosen", "rejected")],
                            trainer)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                      bos_token_id=tok.token_to_id("<|endoftext|>"), eos_token_id=tok.token_to_id("<|im_end|>"))
    model = init_weights(Transformer(cfg), std=0.1, seed=1)
    save(model, d / "model")
    tok.save(str(d / "model" / "tokenizer.json"))
    data = d / "pairs.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return types.SimpleNamespace(dir=d, model=d / "model", data=data, tok=tok, cfg=cfg, records=records,
                                 pad_id=tok.token_to_id("<|endoftext|>"))


def weights(path):
    return load(path).state_dict()


# ----------------------------------------------------------------------------------------------------------------
# The loss


def logps(n, seed):
    """Four [n] float64 tensors of sequence log-probs around -100, so that beta * z spans about -30..30."""
    g = torch.Generator().manual_seed(seed)
    return [-100 + 20 * torch.randn(n, generator=g, dtype=torch.float64) for _ in range(4)]


def log_sigmoid(x):  # float64, written out: log(1 / (1 + e^-x)), stable for either sign of x
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.3, 0.0), (0.5, 0.2)])
def test_dpo_loss_matches_float64_math(beta, eps):
    pc, pr, rc, rr = logps(64, seed=int(beta * 10))
    losses, cr, rjr = dpo.dpo_loss(pc.float(), pr.float(), rc.float(), rr.float(), beta, eps)
    for i in range(64):
        z = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        expected = -(1 - eps) * log_sigmoid(beta * z) - eps * log_sigmoid(-beta * z)
        assert losses[i].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert cr[i].item() == pytest.approx(beta * (pc[i].item() - rc[i].item()), rel=1e-5, abs=1e-5)
        assert rjr[i].item() == pytest.approx(beta * (pr[i].item() - rr[i].item()), rel=1e-5, abs=1e-5)
    ipo, _, _ = dpo.dpo_loss(pc, pr, rc, rr, beta, ipo=True)
    z = (pc - rc) - (pr - rr)
    assert torch.allclose(ipo, (z - 1 / (2 * beta)) ** 2)


def test_dpo_loss_stays_finite_for_huge_gaps():
    pc = torch.tensor([-10.0, -5000.0, -1.0], requires_grad=True)
    pr = torch.tensor([-5000.0, -10.0, -1.0])
    zero = torch.zeros(3)
    for eps in (0.0, 0.1):
        losses, _, _ = dpo.dpo_loss(pc, pr, zero, zero, beta=1.0, label_smoothing=eps)
        assert torch.isfinite(losses).all()
        # beta z = +4990: the clean term is ~0; beta z = -4990: it is ~4990 (log sigmoid(-x) = -x - log(1 + e^-x))
        assert losses[0].item() == pytest.approx(eps * 4990, rel=1e-5, abs=1e-6)
        assert losses[1].item() == pytest.approx((1 - eps) * 4990, rel=1e-5)
        assert losses[2].item() == pytest.approx(math.log(2), rel=1e-6)
        losses.sum().backward()
        assert torch.isfinite(pc.grad).all() and pc.grad.abs().max() <= 1.0
        pc.grad = None


def trl_dpo_loss(pc, pr, rc, rr, beta, loss_type="sigmoid", label_smoothing=0.0, lengths=None):
    """TRL 1.16's own DPOTrainer._compute_loss as an oracle. It is a method that runs the model itself, so it gets
    the least it needs: a stand-in trainer (attributes the method reads), precomputed reference log-probs in the
    inputs, and a stand-in model whose per-token log-probs sum to our sequence log-probs (all on the first
    completion token, zeros after: TRL sums them over the sequence). `lengths` [2B] set the completion masks."""
    from trl.trainer.dpo_trainer import DPOTrainer
    B = pc.shape[0]
    lengths = torch.ones(2 * B, dtype=torch.long) if lengths is None else lengths
    T = int(lengths.max()) + 1
    pos = torch.arange(T)[None]
    completion = ((pos >= 1) & (pos <= lengths[:, None])).long()
    per_token = torch.zeros(2 * B, T - 1, dtype=pc.dtype)
    per_token[:, 0] = torch.cat([pc, pr])
    zeros = torch.zeros_like(per_token)
    outputs = types.SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros > 0)
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        accelerator=types.SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x),
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
        label_smoothing=label_smoothing, use_weighting=False, _total_train_tokens=0, _tp_size=1,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)))
    inputs = {"input_ids": torch.zeros_like(completion), "attention_mask": torch.ones_like(completion),
              "completion_mask": completion, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    loss = DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, False)
    return loss.item(), {k: v[0] for k, v in trainer._metrics["train"].items()}


def test_dpo_loss_matches_trl():
    pytest.importorskip("trl")
    pc, pr, rc, rr = logps(16, seed=3)
    for beta in (0.1, 0.3):
        losses, cr, rjr = dpo.dpo_loss(pc, pr, rc, rr, beta)
        loss, m = trl_dpo_loss(pc, pr, rc, rr, beta)
        assert losses.mean().item() == pytest.approx(loss, rel=1e-12)
        assert cr.mean().item() == pytest.approx(m["rewards/chosen"], rel=1e-12)
        assert rjr.mean().item() == pytest.approx(m["rewards/rejected"], rel=1e-12)
        assert (cr > rjr).double().mean().item() == pytest.approx(m["rewards/accuracies"])
        assert (cr - rjr).mean().item() == pytest.approx(m["rewards/margins"], rel=1e-12)
    # Conservative DPO: TRL 1.16's "sigmoid" ignores label_smoothing; its "aot" loss is exactly
    # -(1-eps) logsigmoid(beta d) - eps logsigmoid(-beta d) with d the z of a batch sorted per pair, so pair by pair
    # (a batch of one: the sort is the identity) it is conservative DPO.
    losses, _, _ = dpo.dpo_loss(pc, pr, rc, rr, 0.3, label_smoothing=0.2)
    for i in range(16):
        one = [x[i:i + 1] for x in (pc, pr, rc, rr)]
        assert losses[i].item() == pytest.approx(trl_dpo_loss(*one, 0.3, "aot", 0.2)[0], rel=1e-12)
    # IPO on per-token means: TRL divides the log-ratios by the completion lengths; dpo.py divides the log-probs.
    lengths = torch.randint(1, 50, (32,), generator=torch.Generator().manual_seed(0))
    loss, _ = trl_dpo_loss(pc, pr, rc, rr, 0.3, "ipo", lengths=lengths)
    n_c, n_r = lengths[:16].double(), lengths[16:].double()
    losses, _, _ = dpo.dpo_loss(pc / n_c, pr / n_r, rc / n_c, rr / n_r, 0.3, ipo=True)
    assert losses.mean().item() == pytest.approx(loss, rel=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Sequence log-probs


def test_logits_at_equals_the_full_forward_at_those_positions(world):
    model = load(world.model)
    tokens = torch.randint(0, world.cfg.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    at = torch.rand(3, 20, generator=torch.Generator().manual_seed(1)) < 0.4
    with torch.no_grad():
        assert torch.allclose(model(tokens, logits_at=at), model(tokens)[at], atol=1e-5)


def test_sequence_logps_by_hand(world):
    model = load(world.model).double()
    examples, _ = dpo.load_pairs(world.data, world.tok, 96, 48)
    batch = dpo.collate(examples[:3], world.pad_id)
    with torch.no_grad():
        got = torch.cat(dpo.concatenated_forward(model, batch))
    for row in range(6):
        e = examples[row % 3]
        ids = e["prompt"] + (e["chosen"] if row < 3 else e["rejected"])
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0]  # float64, the whole sequence, unpadded
        expected = 0.0
        for t in range(len(e["prompt"]), len(ids)):  # every reply token, predicted from the position before it
            expected += torch.log_softmax(logits[t - 1], -1)[ids[t]].item()
        assert got[row].item() == pytest.approx(expected, rel=1e-6)


def test_concatenated_forward_equals_separate_forwards(world):
    model = load(world.model)
    examples, _ = dpo.load_pairs(world.data, world.tok, 96, 48)
    with torch.no_grad():
        chosen, rejected = dpo.concatenated_forward(model, dpo.collate(examples[:4], world.pad_id))
        for key, got in (("chosen", chosen), ("rejected", rejected)):
            for i, e in enumerate(examples[:4]):
                ids = e["prompt"] + e[key]  # one sequence, no padding, full logits
                logps = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
                expected = sum(logps[t - 1, ids[t]] for t in range(len(e["prompt"]), len(ids)))
                assert got[i].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_logps_and_gradients_match_float64(world, tied, monkeypatch):
    """concatenated_forward (model.token_logps, chunks of 7 positions: boundaries inside every sequence) against the
    full float64 logits and log-softmax, values and the gradient of every parameter (tied: the head's gradient must
    reach the embedding)."""
    import model as model_py
    monkeypatch.setattr(model_py, "LOGPS_CHUNK", 7)
    cfg = ModelConfig(**{**world.cfg.__dict__, "tie_word_embeddings": tied})
    policy = init_weights(Transformer(cfg), std=0.1, seed=2)
    oracle = init_weights(Transformer(cfg), std=0.1, seed=2).double()
    examples, _ = dpo.load_pairs(world.data, world.tok, 96, 48)
    batch = dpo.collate(examples[:3], world.pad_id)
    weight = torch.tensor([0.5, -1.0, 2.0, 1.5, -0.3, 0.7], dtype=torch.float64)  # a different upstream grad per row
    chosen, rejected = dpo.concatenated_forward(policy, batch)
    (torch.cat([chosen, rejected]) * weight.float()).sum().backward()
    tokens, mask = batch["tokens"], batch["mask"]
    logp = torch.log_softmax(oracle(tokens)[:, :-1], -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    expected = (logp * mask[:, 1:]).sum(-1)
    (expected * weight).sum().backward()
    assert torch.allclose(torch.cat([chosen, rejected]).double(), expected, rtol=1e-5)
    assert mask.sum() > 7 * 10
    got, want = dict(policy.named_parameters()), dict(oracle.named_parameters())
    for name in want:
        torch.testing.assert_close(got[name].grad.double(), want[name].grad, rtol=1e-4, atol=2e-5, msg=lambda m: f"{name}: {m}")


def test_chunked_logps_under_bf16_autocast_match_the_plain_head():
    """Under autocast the head computes in bf16 as nn.Linear would (then fp32 log-softmax); backward recomputes the
    same bf16 logits. Oracle: autograd through the plain bf16 head, full logits."""
    from model import token_logps
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 16, generator=g, requires_grad=True)
    head = (torch.randn(300, 16, generator=g) * 0.3).requires_grad_(True)
    targets = torch.randint(0, 300, (40,), generator=g)
    up = torch.randn(40, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = token_logps(hidden, head, targets, chunk_size=9)
        (got * up).sum().backward()
        logits = torch.nn.functional.linear(hidden, head).float()
    assert logits.requires_grad and got.dtype == torch.float32
    grads = hidden.grad.clone(), head.grad.clone()
    hidden.grad = head.grad = None
    want = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    (want * up).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-2, atol=1e-3)  # bf16 matmuls in both
    torch.testing.assert_close(grads[1], head.grad, rtol=1e-2, atol=1e-2)  # ours sums chunks in fp32


def test_step_zero_loss_is_ln2_and_rewards_zero(world):
    policy, reference = load(world.model).train(), load(world.model).eval()
    examples, _ = dpo.load_pairs(world.data, world.tok, 64, 32)
    batch = dpo.collate(examples[:8], world.pad_id)
    pc, pr = dpo.concatenated_forward(policy, batch)
    with torch.no_grad():
        rc, rr = dpo.concatenated_forward(reference, batch)
    losses, cr, rjr = dpo.dpo_loss(pc, pr, rc, rr, beta=0.3)
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)), atol=1e-6)
    assert cr.abs().max() < 1e-6 and rjr.abs().max() < 1e-6


def test_training_loss_options_ipo_and_rpo(world):
    """The loss the training step backpropagates: sums over pairs; IPO on per-token means; + alpha * chosen NLL."""
    policy, reference = load(world.model), load(world.model)
    with torch.no_grad():  # make the policy differ from the reference
        for p in policy.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    examples, _ = dpo.load_pairs(world.data, world.tok, 96, 48)
    batch = dpo.collate(examples[:4], world.pad_id)
    with torch.no_grad():
        pc, pr = dpo.concatenated_forward(policy, batch)
        rc, rr = dpo.concatenated_forward(reference, batch)
    n_c = torch.tensor([len(e["chosen"]) for e in examples[:4]], dtype=torch.float32)
    n_r = torch.tensor([len(e["rejected"]) for e in examples[:4]], dtype=torch.float32)
    args = types.SimpleNamespace(beta=0.5, label_smoothing=0.0, ipo=False, rpo_alpha=0.0)
    for ipo, alpha in ((False, 0.0), (True, 0.0), (False, 1.0)):
        args.ipo, args.rpo_alpha = ipo, alpha
        with torch.no_grad():
            loss, m = dpo.batch_loss(policy, batch, **vars(args), ref=reference)
        z = (pc - rc) / n_c - (pr - rr) / n_r if ipo else (pc - rc) - (pr - rr)
        expected = (z - 1.0) ** 2 if ipo else -torch.nn.functional.logsigmoid(0.5 * z) - alpha * pc / n_c
        assert loss.item() == pytest.approx(expected.sum().item(), rel=1e-5)
        assert m["logps/chosen"].item() == pytest.approx(pc.sum().item(), rel=1e-5)
    args.ipo, args.rpo_alpha = False, 0.0
    with torch.no_grad():
        live = dpo.batch_loss(policy, batch, **vars(args), ref=reference)[0]
        batch["ref_logps"] = torch.stack([rc, rr])  # precomputed: the same loss without a reference model
        assert dpo.batch_loss(policy, batch, **vars(args))[0].item() == pytest.approx(live.item(), rel=1e-6)


def test_replay_adds_each_pairs_sft_nll_per_token(world, tmp_path):
    """--replay: each pair's loss gains weight * its replay example's NLL per answer token, by hand in float64."""
    replay_path = tmp_path / "replay.jsonl"
    sft_records = [{"messages": [{"role": "user", "content": f"问{i}"}, {"role": "assistant", "content": f"答{i}肺炎"}]}
                   for i in range(3)]
    write_jsonl(replay_path, sft_records)
    model = load(world.model).double()
    examples, _ = dpo.load_pairs(world.data, world.tok, 96, 48)
    examples = examples[:5]
    counts = dpo.attach_replay(examples, replay_path, world.tok, 96, seed=0)
    assert counts["used"] == 3 and len({id(e["replay"]) for e in examples}) == 3  # 5 pairs cycle 3 examples
    batch = dpo.collate(examples, world.pad_id)
    with torch.no_grad():
        base = dpo.batch_loss(model, {k: v for k, v in batch.items() if not k.startswith("replay")}, beta=0.3,
                              ref=model)[0]
        loss, m = dpo.batch_loss(model, batch, beta=0.3, replay_weight=0.7, ref=model)
    expected = 0.0
    for e in examples:
        ids, mask = e["replay"]
        with torch.no_grad():
            logps = torch.log_softmax(model(torch.tensor([ids]))[0], -1)
        answer = [t for t in range(1, len(ids)) if mask[t]]
        expected -= sum(logps[t - 1, ids[t]].item() for t in answer) / len(answer)
    assert loss.item() - base.item() == pytest.approx(0.7 * expected, rel=1e-6)
    assert m["nll/replay"].item() == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Data


def test_pairs_tokenize_with_a_shared_prompt_and_exact_replies(world):
    examples, counts = dpo.load_pairs(world.data, world.tok, 1000, 500)
    assert counts["pairs"] == 24 and len(examples) == 24
    for e, r in zip(examples, world.records):
        for key in ("chosen", "rejected"):
            ids, mask = encode_chat(world.tok, r["prompt"] + r[key])
            assert ids[:len(e["prompt"])] == e["prompt"]
            assert [i for i, m in zip(ids, mask) if m] == e[key]  # the reply and its <|im_end|>
            assert world.tok.decode(e[key], skip_special_tokens=False).endswith(r[key][0]["content"] + "<|im_end|>")
        assert world.tok.decode(e["prompt"], skip_special_tokens=False).endswith("<|im_start|>assistant\n")


def test_truncation_and_skips_are_counted(world, tmp_path):
    good = world.records[0]  # 56 prompt, 38 chosen, 9 rejected tokens
    reply = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    lines = [json.dumps(good, ensure_ascii=False), "{not json", json.dumps({"prompt": "x", "chosen": "y"}),
             json.dumps({**good, "rejected": good["chosen"]}),  # identical replies: z = 0 for ever
             json.dumps({**good, "prompt": [{"role": "user", "content": "长" * 200}],
                         "chosen": reply("答案：肺炎")}),
             json.dumps({**good, "chosen": reply("嗯" * 60 + "甲"), "rejected": reply("嗯" * 60 + "乙")})]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    full, _ = dpo.load_pairs(world.data, world.tok, 1000, 500)
    examples, counts = dpo.load_pairs(path, world.tok, 50, 20)
    # kept: the good pair (prompt and chosen cut), the long prompt (prompt cut); skipped: 2 bad lines, the identical
    # pair, and the pair whose replies differ only after the cut
    assert counts == dict(pairs=2, rejected_cut_after_first_wrong_line=0, prompt_truncated=2, responses_truncated=1,
                          skipped_bad=2, skipped_identical=2)
    for e in examples:
        assert len(e["prompt"]) + max(len(e["chosen"]), len(e["rejected"])) <= 50
    # the prompt loses tokens from the left (down to --max-prompt-length), the replies from the right
    assert examples[0]["prompt"] == full[0]["prompt"][-20:]
    assert examples[0]["chosen"] == full[0]["chosen"][:30]
    assert examples[0]["rejected"] == full[0]["rejected"]
    assert len(examples[1]["prompt"]) == 50 - len(examples[1]["rejected"]) > 20


def test_rejected_reply_is_cut_after_its_first_wrong_line(world, tmp_path):
    """--truncate-rejected: the rejected reply keeps the lines it shares with the chosen one and the first line that
    differs, without <|im_end|>; replies differing only in their last line stay whole. Expected texts by hand."""
    chosen = "<think>\n审题：单选\n提取：发热、咳嗽\nA 肺炎：发热有，对\nB 胃炎：发热无，错\n</think>\n答案：A"
    rejected = "<think>\n审题：单选\n提取：发热、咳嗽\nA 肺炎：发热无，错\nB 胃炎：发热有，对\n</think>\n答案：B"
    reply = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    prompt = world.records[0]["prompt"]
    records = [{"prompt": prompt, "chosen": reply(chosen), "rejected": reply(rejected)},
               {"prompt": prompt, "chosen": reply(chosen), "rejected": reply(chosen[:-1] + "B")},
               {"prompt": prompt, "chosen": reply(chosen), "rejected": reply("答案：B")}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    whole, _ = dpo.load_pairs(path, world.tok, 1000, 500)
    cut, counts = dpo.load_pairs(path, world.tok, 1000, 500, truncate_rejected=True)
    assert counts["rejected_cut_after_first_wrong_line"] == 1 and counts["pairs"] == 3
    text = lambda ids: world.tok.decode(ids, skip_special_tokens=False)  # noqa: E731
    assert text(cut[0]["rejected"]) == "<think>\n审题：单选\n提取：发热、咳嗽\nA 肺炎：发热无，错\n"
    assert cut[0]["rejected"] == whole[0]["rejected"][:len(cut[0]["rejected"])]
    assert text(cut[1]["rejected"]) == chosen[:-1] + "B<|im_end|>"  # only the answer line differs: all of it
    assert text(cut[2]["rejected"]) == "答案：B<|im_end|>"  # one line, wrong from its first token: all of it
    for a, b in zip(cut, whole):
        assert a["prompt"] == b["prompt"] and a["chosen"] == b["chosen"]


# ----------------------------------------------------------------------------------------------------------------
# Memory on paper


QWEN7B = ModelConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)


def test_memory_estimate():
    est = dpo.estimate_memory(QWEN7B, 8, 1, 4096)
    assert est["n_params"] == 7_615_616_512  # Qwen2.5-7B's parameter count (its safetensors index: 15.23 GB bf16)
    assert est["held"]["parameters"] == 4 * 7_615_616_512 / 8
    assert dpo.estimate_memory(QWEN7B, 8, 1, 4096, precompute_ref=True)["held"]["reference model"] == 0
    lora = dpo.estimate_memory(QWEN7B, 8, 1, 4096, lora_rank=8)
    assert lora["held"]["reference model"] == 0 and lora["held"]["head gradient, fp32, summed over chunks"] == 0
    assert lora["held"]["AdamW moments (2 x fp32)"] == 8 * 20_185_088 / 8  # peft's count of r=8 on all 7 layers
    # The activation formula against what autograd really saves for one block of a small model (bf16).
    cfg = ModelConfig(vocab_size=64, hidden_size=128, intermediate_size=352, num_hidden_layers=1,
                      num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
    with torch.device("meta"):
        assert sum(p.numel() for p in Transformer(cfg).parameters()) == dpo.estimate_memory(cfg, 1, 1, 1)["n_params"]
    model = init_weights(Transformer(cfg)).to(torch.bfloat16).train()
    params = {p.data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.data_ptr() not in params and t.numel() > 1000:  # not weights, not cos/sin tables
            saved[t.data_ptr()] = max(saved.get(t.data_ptr(), 0), t.numel() * t.element_size())
        return t
    x = torch.randn(2, 64, 128, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = (torch.ones(2, 64, 16, dtype=torch.bfloat16),) * 2
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.layers[0](x, cos, sin)
    no_ckpt = dpo.estimate_memory(cfg, 1, 1, 64, checkpointing=False)["held"]["activations"]  # 1 layer x 2 rows x 64
    assert sum(saved.values()) == pytest.approx(no_ckpt, rel=0.15)


@pytest.mark.parametrize("case", ["full", "lora", "precompute"])
def test_memory_estimate_matches_a_measured_step(tmp_path_factory, case):
    """estimate_memory's peak against the peak resident memory of the real thing on CPU (fp32, one process): two DPO
    steps (full fine-tuning with a live reference; LoRA with the adapter-off reference) or the --precompute-ref pass,
    of a 2-layer model with Qwen2.5's vocabulary (152,064: the head dominates, as it does the loss), each in a fresh
    process. glibc's mmap threshold is pinned so that freed tensors leave the resident set (the default moves it up
    to 32 MB as big blocks are freed, and memory then lingers in the heap)."""
    folder = tmp_path_factory.getbasetemp() / "vocab152k"
    cfg = ModelConfig(vocab_size=152064, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    if not (folder / "config.json").is_file():
        save(init_weights(Transformer(cfg)), folder)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "memory_probe.py"), str(folder), case, "384", "1"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.splitlines()[-1])["peak"]
    est = dpo.estimate_memory(cfg, 1, 1, 384, precompute_ref=case == "precompute", checkpointing=False,
                              lora_rank=8 if case == "lora" else 0, compute_bytes=4, precompute_batch=1)
    predicted = est["moments"]["--precompute-ref pass"] if case == "precompute" else est["peak"]
    print(f"{case}: measured {measured / 2**20:.0f} MiB, estimated {predicted / 2**20:.0f} MiB")
    assert measured == pytest.approx(predicted, rel=0.15), (measured / 2**20, predicted / 2**20)


# ----------------------------------------------------------------------------------------------------------------
# Training runs: 6 steps of 4 pairs (micro-batches of 2) on the 24 pairs, lr 1e-3 (a tiny model moves fast).


def run_args(world, out, *extra):
    return ["--model", str(world.model), "--data", str(world.data), "--out", str(out), "--lr", "1e-3",
            "--beta", "0.5", "--batch-size", "4", "--micro-batch-size", "2", "--steps", "6", "--warmup", "0.2",
            "--max-length", "96", "--max-prompt-length", "48", *extra]


def metrics(out):
    return [r for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def torchrun(args, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(ROOT / "dpo.py"), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="session")
def single_run(world):
    out = world.dir / "single"
    dpo.main(run_args(world, out))
    return out


def assert_same_run(a, b, rel=1e-4):
    ma, mb = metrics(a), metrics(b)
    assert [m["step"] for m in ma] == [m["step"] for m in mb] == list(range(1, 7))
    for x, y in zip(ma, mb):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
            assert x[key] == pytest.approx(y[key], rel=rel, abs=1e-5), (x["step"], key)
    wa, wb = weights(Path(a) / "step-000006"), weights(Path(b) / "step-000006")
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=1e-5), name


def test_first_step_loss_is_ln2_and_training_separates_the_pairs(world, single_run):
    first = metrics(single_run)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == 0
    # Implicit rewards of all 24 pairs, trained policy against the reference, computed here from the checkpoint.
    examples, _ = dpo.load_pairs(world.data, world.tok, 96, 48)
    batch = dpo.collate(examples, world.pad_id)
    with torch.no_grad():
        pc, pr = dpo.concatenated_forward(load(single_run / "step-000006"), batch)
        rc, rr = dpo.concatenated_forward(load(world.model), batch)
    _, chosen_rewards, rejected_rewards = dpo.dpo_loss(pc, pr, rc, rr, beta=0.5)
    margins = chosen_rewards - rejected_rewards
    assert (margins > 0).float().mean() >= 0.9 and margins.mean() > 1.0
    assert metrics(single_run)[-1]["rewards/accuracies"] == 1.0


def test_two_processes_match_one(world, single_run, tmp_path):
    # 2 ranks x 2 micro-batches of 1 pair, FSDP2-sharded, with activation checkpointing (the single run has none)
    torchrun(run_args(world, tmp_path / "two", "--micro-batch-size", "1", "--activation-checkpointing"))
    assert_same_run(single_run, tmp_path / "two")


def test_precompute_ref_matches_live_reference(world, single_run, tmp_path):
    for old in world.dir.glob("pairs.jsonl.ref-*"):
        old.unlink()
    # Two ranks, 5 pairs a forward: 12 pairs per rank in 3 forwards, the last one short.
    torchrun(run_args(world, tmp_path / "pre", "--precompute-ref", "--precompute-batch", "5"))
    assert_same_run(single_run, tmp_path / "pre")
    [cache] = world.dir.glob("pairs.jsonl.ref-*.pt")
    examples, _ = dpo.load_pairs(world.data, world.tok, 96, 48)
    with torch.no_grad():
        live = torch.stack(dpo.concatenated_forward(load(world.model), dpo.collate(examples, world.pad_id)))
    assert torch.allclose(torch.load(cache), live, rtol=1e-5)
    cache.write_bytes(b"not a tensor")  # a second run must read the cache, not recompute it
    with pytest.raises(Exception):
        dpo.main(run_args(world, tmp_path / "again", "--precompute-ref", "--steps", "1"))
    cache.unlink()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_precomputed_reference_computes_in_the_policy_dtype(world, tmp_path, monkeypatch, dtype):
    """Step 0 is ln 2 with a precomputed reference whatever --dtype is. CPU autocast is switched on here for bf16 (as
    on GPUs): a reference scored under bf16 autocast while the policy trains in fp32 would miss ln 2 by ~1e-3."""
    import sft
    cpu_autocast = lambda device, dtype: torch.autocast("cpu", dtype=torch.bfloat16,  # noqa: E731
                                                        enabled=dtype == torch.bfloat16)
    monkeypatch.setattr(sft, "autocast", cpu_autocast)
    monkeypatch.setattr(dpo, "autocast", cpu_autocast)
    data = tmp_path / "pairs.jsonl"  # its own reference cache, beside this copy
    data.write_bytes(world.data.read_bytes())
    args = run_args(world, tmp_path / "run", "--precompute-ref", "--dtype", dtype, "--steps", "1")
    args[args.index("--data") + 1] = str(data)
    dpo.main(args)
    # bf16: the precompute pass batches 4 pairs, training 2, and bf16 matmuls of other shapes round differently
    # (6e-5 here); the fp32 policy against the old bf16 reference was off by 5e-3.
    assert metrics(tmp_path / "run")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6 if dtype == "float32" else 3e-4)


RESHARD_PROBE = """
import json, sys, torch
sys.path.insert(0, sys.argv[2])
import dpo, sft
from torch.distributed.tensor import DTensor
rank, world_size, device = sft.init_distributed()
out = {}
for name, ref in (("prepare_model", sft.prepare_model(sft.load_model(sys.argv[1]), device, world_size).eval()),
                  ("load_reference", dpo.load_reference(sys.argv[1], device, world_size, torch.float32))):
    with torch.no_grad():
        ref(torch.tensor([[1, 2, 3]]))
    out[name] = {"root": isinstance(ref.embed_tokens.weight, DTensor), "block": isinstance(ref.layers[0].mlp.up_proj.weight, DTensor)}
if rank == 0:
    print(json.dumps(out))
sft.teardown_distributed()
"""


def test_reference_root_is_resharded_after_its_forward(world, tmp_path):
    """FSDP2 leaves the root (embedding, norm, head) gathered after a forward, waiting for a backward; a frozen
    reference never runs one, so load_reference reshards it after each forward. Sharded = a DTensor parameter."""
    script = tmp_path / "probe.py"
    script.write_text(RESHARD_PROBE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script), str(world.model), str(ROOT)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    sharded = json.loads(done.stdout.strip().splitlines()[-1])
    assert sharded == {"prepare_model": {"root": False, "block": True}, "load_reference": {"root": True, "block": True}}


def kill_at_step_2_then_resume(world, out, *extra):
    """Run dpo.py in a process, SIGKILL it once step 2's checkpoint exists, then resume the run to its end here."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "dpo.py"), *run_args(world, out, *extra, "--save-every", "2")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (out / "step-000002").exists() and proc.poll() is None:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "step-000006").exists()
    dpo.main(run_args(world, out, *extra, "--save-every", "2", "--resume"))


def test_resume_after_kill_equals_uninterrupted_run(world, single_run, tmp_path):
    kill_at_step_2_then_resume(world, tmp_path / "killed")
    assert_same_run(single_run, tmp_path / "killed", rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# LoRA DPO: the reference is the policy with its adapters off (no second model, no precompute)

LORA = ("--lora-rank", "4", "--lr", "1e-2")


@pytest.fixture(scope="session")
def lora_run(world):
    out = world.dir / "lora"
    dpo.main(run_args(world, out, *LORA))
    return out


def test_lora_step_zero_is_ln2_and_only_the_adapters_move(world, lora_run):
    from safetensors.torch import load_file
    from model import ADAPTER_FILE, LoRAConfig, add_lora, load_adapter
    records = metrics(lora_run)
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert records[0]["rewards/chosen"] == records[0]["rewards/rejected"] == 0
    assert records[-1]["loss"] < 0.6 and records[-1]["rewards/margins"] > 0
    final = lora_run / "step-000006"
    # The merged checkpoint = base + (alpha / r) B A of the saved adapter (alpha defaults to 2 x rank).
    adapter = load_file(str(final / "adapter" / ADAPTER_FILE))
    base, merged = weights(world.model), weights(final)
    a = adapter["base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"]
    b = adapter["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"]
    assert b.abs().max() > 1e-3
    torch.testing.assert_close(merged["layers.1.mlp.up_proj.weight"], base["layers.1.mlp.up_proj.weight"] + 2.0 * b @ a)
    for name in base:  # norms, embeddings, head: frozen
        if "proj" not in name:
            assert torch.equal(base[name], merged[name]), name
    # The implicit rewards of the trained adapter against the adapter-off base separate the pairs.
    policy = add_lora(load(world.model), LoRAConfig(rank=4, alpha=8.0))
    load_adapter(policy, final / "adapter")
    examples, _ = dpo.load_pairs(world.data, world.tok, 96, 48)
    batch = dpo.collate(examples, world.pad_id)
    with torch.no_grad():
        pc, pr = dpo.concatenated_forward(policy, batch)
        rc, rr = dpo.concatenated_forward(load(world.model), batch)
    assert (((pc - rc) - (pr - rr)) > 0).float().mean() >= 0.8


def test_lora_two_processes_match_one(world, lora_run, tmp_path):
    # FSDP2 with frozen bf16-or-fp32 base and trainable fp32 adapters in one unit, activation checkpointing
    torchrun(run_args(world, tmp_path / "two", *LORA, "--micro-batch-size", "1", "--activation-checkpointing"))
    assert_same_run(lora_run, tmp_path / "two")


def test_lora_resume_after_kill_equals_uninterrupted_run(world, lora_run, tmp_path):
    """The resume state is the base (--model) + the checkpoint's adapter + its AdamW moments."""
    kill_at_step_2_then_resume(world, tmp_path / "killed", *LORA)
    assert_same_run(lora_run, tmp_path / "killed", rel=1e-6)
