"""sft.py: labels, truncation, loss normalisation (float64 oracle), schedule, convergence, resume, torchrun == 1 process.

Everything runs on a 2-layer, hidden-32 Qwen2 and a tiny byte-level BPE tokenizer built here with Qwen's special
tokens; the label test also runs on the real Qwen2.5 tokenizer from ../shared when it is there.
"""
import copy
import json
import math
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import sft
from conftest import ROOT, SHARED
from model import ModelConfig, Transformer, init_weights, load_tokenizer, save
from templates import chat, encode_chat

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP in one process
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY = {"model_type": "qwen2", "vocab_size": 320, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}
QUESTIONS = [(f"what is {a} plus {b}?", f"the answer is {a + b}.") for a, b in
             [(1, 2), (3, 4), (2, 2), (5, 1), (0, 3), (4, 4), (6, 2), (1, 7)]]


def chat_record(question, answer, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": messages + [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and 2 shared cores oversubscribed by intra-op threads crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A folder with a tiny tokenizer.json (Qwen's special tokens as added specials) and config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    folder = tmp_path_factory.mktemp("tiny")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["system user assistant You are Qwen, created by Alibaba Cloud. You are a helpful assistant."]
    corpus += [q + " " + a for q, a in QUESTIONS]
    tok.train_from_iterator(corpus * 5, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text(json.dumps(TINY))
    return folder


def tiny_model(seed=0, **overrides):
    return init_weights(Transformer(ModelConfig.from_hf({**TINY, **overrides})), std=0.1, seed=seed)


# ----------------------------------------------------------------------------------------------------------------
# Labels


def check_labels(tokenizer, messages):
    """Trained targets, read off collate_rows + next_token_targets (what the model is scored on), are exactly each
    assistant reply + <|im_end|>."""
    ids, mask = encode_chat(tokenizer, messages)
    batch = sft.collate_rows([(ids, mask), (ids[:5], mask[:5])], pad_id=0, device="cpu")
    inputs, at, targets = sft.next_token_targets(batch["tokens"], batch["mask"])
    assert inputs[0].tolist() == ids[:-1]
    trained = at[0]
    # Each target is the NEXT input token (the shift), and the trained targets decode to the replies.
    assert torch.equal(targets[:int(trained.sum())], torch.tensor(ids[1:])[trained])
    spans, current = [], []
    for t, target in zip(trained.tolist(), ids[1:]):
        if t:
            current.append(target)
        elif current:
            spans.append(current)
            current = []
    spans += [current] if current else []
    replies = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    assert [tokenizer.decode(s, skip_special_tokens=False) for s in spans] == replies
    assert batch["units"] == sum(len(s) for s in spans) + 0 == len(targets)  # the short padded row has no trained token
    assert not at[1].any() and (batch["tokens"][1, 5:] == 0).all()


CONVERSATION = [{"role": "user", "content": "患者男，45岁，胸痛3小时。最可能的诊断？"},
                {"role": "assistant", "content": "<think>\n胸痛伴心电图ST段抬高。\n</think>\n答案：A"},
                {"role": "user", "content": "为什么不是B？"},
                {"role": "assistant", "content": "因为B不符合。答案：A"}]


def test_labels_cover_exactly_the_assistant_replies_tiny(tiny):
    tok = load_tokenizer(tiny)
    check_labels(tok, [{"role": "user", "content": "what is 1 plus 2?"},
                       {"role": "assistant", "content": "the answer is 3."},
                       {"role": "user", "content": "and 2 plus 2?"}, {"role": "assistant", "content": "4."}])


def test_labels_cover_exactly_the_assistant_replies_real_tokenizer():
    path = SHARED / "data" / "qwen2.5-tokenizer"
    if not (path / "tokenizer.json").is_file():
        pytest.skip("real Qwen2.5 tokenizer not in ../shared")
    tok = load_tokenizer(path)
    check_labels(tok, CONVERSATION)
    ids, _ = encode_chat(tok, CONVERSATION)
    assert ids.count(151645) == 5 and ids[-2:] == [151645, 198]  # <|im_end|>, then "\n" (byte-level "Ċ")
    assert ids == tok.encode(chat(CONVERSATION, add_generation_prompt=False)).ids  # what inference tokenizes


# ----------------------------------------------------------------------------------------------------------------
# Data: truncation, windows, bad records


def test_left_truncation_keeps_the_answer_and_counts(tiny, tmp_path, capsys):
    tok = load_tokenizer(tiny)
    long_question = "what is 1 plus 2? " * 30
    records = [chat_record(long_question, "the answer is 3."),                 # truncated from the left
               chat_record("what is 1 plus 2?", "the answer is 3. " * 40),     # answer alone too long: skipped
               chat_record("what is 2 plus 2?", "the answer is 4."),           # fits
               {"prompt": [{"role": "user", "content": "what is 0 plus 3?"}],  # TRL prompt-completion
                "completion": [{"role": "assistant", "content": "the answer is 3."}]},
               "{not json", {"text": 1}, {"messages": [{"role": "user", "content": "no reply"}]},
               {"messages": [{"role": "robot", "content": "x"}]}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    max_len = 100  # the short chats take ~80 tiny-tokenizer tokens, the long prompt ~430, the long answer ~400
    examples, counts = sft.tokenize_records(path, tok, max_len, verbose=True)
    assert counts == {"chats": 3, "prompt truncated (left)": 1, "skipped: answer longer than max_len": 1,
                      "skipped: not JSON": 1, "skipped: no messages, prompt/completion lists or text": 1,
                      "skipped: no assistant message": 1, "skipped: bad messages: ValueError": 1}
    assert "d.jsonl:5: skipped (not JSON)" in capsys.readouterr().out
    full_ids, full_mask = encode_chat(tok, records[0]["messages"])
    ids, mask = examples[0]
    assert len(ids) == max_len and ids == full_ids[-max_len:] and mask == full_mask[-max_len:]
    assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == "the answer is 3.<|im_end|>"
    assert examples[1] == encode_chat(tok, records[2]["messages"])
    assert examples[2] == encode_chat(tok, records[3]["prompt"] + records[3]["completion"])


def test_text_records_become_windows_that_train_every_token_once(tiny, tmp_path):
    tok = load_tokenizer(tiny)
    text = " ".join(q + " " + a for q, a in QUESTIONS)
    ids = tok.encode(text, add_special_tokens=False).ids + [tok.token_to_id("<|endoftext|>")]
    examples, counts = sft.tokenize_records(write_jsonl(tmp_path / "t.jsonl", [{"text": text}]), tok, 16, False)
    assert counts["text windows"] == math.ceil((len(ids) - 1) / 15) == len(examples) > 2
    batch = sft.collate_rows(examples, pad_id=0, device="cpu")
    targets = sft.next_token_targets(batch["tokens"], batch["mask"])[2].tolist()  # row-major = document order
    assert targets == ids[1:]


# ----------------------------------------------------------------------------------------------------------------
# Loss normalisation: a float64 oracle written out here


@pytest.mark.parametrize("chunk", [None, 5])
def test_step_loss_and_gradient_are_the_token_mean_over_the_whole_step(tiny, chunk, monkeypatch):
    """Also with the head's log-softmax in chunks of 5 positions (model.token_logps), boundaries inside examples."""
    if chunk:
        import model as model_py
        monkeypatch.setattr(model_py, "LOGPS_CHUNK", chunk)
    tok = load_tokenizer(tiny)
    examples = [encode_chat(tok, chat_record(q, a * k)["messages"]) for k, (q, a) in zip([1, 3, 1, 6], QUESTIONS)]
    micro_batches = [sft.collate_rows(examples[:3], 0, "cpu"), sft.collate_rows(examples[3:], 0, "cpu")]
    model = tiny_model(seed=1)
    ref = copy.deepcopy(model).double()

    # Oracle: sum over every trained target of -log p, in float64, unpadded examples one at a time, / total count.
    total_nll, count = torch.zeros((), dtype=torch.float64), 0
    per_micro = []
    for group in (examples[:3], examples[3:]):
        group_nll, group_count = torch.zeros((), dtype=torch.float64), 0
        for ids, mask in group:
            logp = torch.log_softmax(ref(torch.tensor([ids[:-1]]))[0], dim=-1)
            for t in range(len(ids) - 1):
                if mask[t + 1]:
                    group_nll = group_nll - logp[t, ids[t + 1]]
                    group_count += 1
        per_micro.append(group_nll / group_count)
        total_nll, count = total_nll + group_nll, count + group_count
    oracle = total_nll / count
    oracle.backward()
    naive = (per_micro[0] + per_micro[1]) / 2  # mean of per-micro-batch means: what must NOT come out

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # new weights = old - gradient, exactly readable
    stats = sft.train_step(model, optimizer, micro_batches, sft.sft_loss, lr=1.0, grad_clip=0.0, device=torch.device("cpu"))
    assert stats["units"] == count and count == sum(b["units"] for b in micro_batches)
    assert abs(stats["loss"] - oracle.item()) < 1e-6 < abs(naive.item() - oracle.item())
    for name, p in model.named_parameters():
        grad = before[name] - p.detach()
        expected = dict(ref.named_parameters())[name].grad.float()
        torch.testing.assert_close(grad, expected, atol=2e-6, rtol=1e-4, msg=name)
    assert abs(stats["grad_norm"] - math.sqrt(sum(p.grad.pow(2).sum() for p in ref.parameters()))) < 1e-4


def test_lr_schedule_warmup_then_cosine():
    peak, total, warm = 1e-3, 12, 2
    lrs = [sft.lr_at(s, total, warm, peak, min_lr_ratio=0.1) for s in range(total)]
    assert lrs[0] == pytest.approx(peak / 2) and lrs[1] == pytest.approx(peak)
    assert lrs[-1] == pytest.approx(peak * 0.1)
    mid = 2 + 9 / 2  # halfway through the decay: half of the way from peak to the floor
    assert sft.lr_at(mid, total, warm, peak, 0.1) == pytest.approx(peak * (0.1 + 0.9 * 0.5))
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_no_weight_decay_on_biases_and_norms():
    model = tiny_model()
    opt = sft.build_optimizer(model, lr=1e-3, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert plain == {n for n in names.values() if n.endswith(".bias") or n.endswith("norm.weight")}
    assert "lm_head.weight" in decayed and "layers.0.mlp.up_proj.weight" in decayed and not decayed & plain


# ----------------------------------------------------------------------------------------------------------------
# End to end: the command line


def run_sft(tiny, data, out, *extra):
    sft.main(["--init-config", str(tiny / "config.json"), "--tokenizer", str(tiny), "--data", str(data),
              "--out", str(out), "--batch-size", "4", "--micro-batch-size", "2", "--seed", "3", *extra])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_steps_group_examples_by_length_without_changing_what_a_step_trains():
    """Sorting a step's batch by length and dealing it to the ranks keeps exactly the examples of the plain stream
    (checked against a permutation drawn here), covers every example once per epoch, and cuts the padding."""
    n, batch, world, micro = 400, 8, 2, 2
    rng = random.Random(0)
    lengths = [rng.choice([20, 30, 200, 260]) for _ in range(n)]
    padded = {False: 0, True: 0}
    for step in range(n // batch):
        stream = np.random.default_rng([5, 0]).permutation(n)[step * batch:(step + 1) * batch].tolist()
        ranks = [sft.batch_indices(step, n, batch, 5, r, world, lengths) for r in range(world)]
        assert sorted(i for rank in ranks for i in rank) == sorted(stream)
        for r, rank in enumerate(ranks):
            assert [lengths[i] for i in rank] == sorted(lengths[i] for i in rank)
            plain = stream[r * batch // world:(r + 1) * batch // world]  # the old contiguous slice
            for grouped, idx in ((True, rank), (False, plain)):
                padded[grouped] += sum(micro * max(lengths[i] for i in idx[j:j + micro])
                                       for j in range(0, len(idx), micro))
    epoch = [i for step in range(n // batch) for r in range(world)
             for i in sft.batch_indices(step, n, batch, 5, r, world, lengths)]
    assert sorted(epoch) == list(range(n))
    assert padded[True] < 0.9 * padded[False]  # 0.85 for this mix


def test_help():
    result = subprocess.run([sys.executable, str(ROOT / "sft.py"), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--resume" in result.stdout and "--init-config" in result.stdout


def test_sft_drives_the_loss_near_zero(tiny, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [chat_record(q, a) for q, a in QUESTIONS[:4]])
    records = run_sft(tiny, data, tmp_path / "run", "--steps", "100", "--lr", "1e-2", "--min-lr-ratio", "0.5", "--save-every", "1000")
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[0] > 4 and losses[-1] < 0.05, losses[::20]
    assert {"lr", "grad_norm", "tokens_per_s", "epoch", "units"} <= set(records[-1])
    # The checkpoint carries the tokenizer it was trained with, so the next stage needs no --tokenizer.
    assert (tmp_path / "run" / "final" / "tokenizer.json").read_bytes() == (tiny / "tokenizer.json").read_bytes()


def weights(path):
    return load_file(str(path / "model.safetensors"))


def test_resumed_run_ends_with_the_same_weights(tiny, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [chat_record(q, a) for q, a in QUESTIONS])
    full, cut = tmp_path / "full", tmp_path / "cut"
    uninterrupted = run_sft(tiny, data, full, "--steps", "6", "--save-every", "3", "--lr", "3e-3")
    # The interrupted run: everything after step 3 is gone, and a kill in the middle of saving step 6 left a
    # half-written temporary folder, which resume must ignore.
    shutil.copytree(full, cut, symlinks=True)
    shutil.rmtree(cut / "step-000006")
    (cut / ".tmp-step-000006").mkdir()
    (cut / ".tmp-step-000006" / "config.json").write_text("{}")
    resumed = run_sft(tiny, data, cut, "--steps", "6", "--save-every", "3", "--lr", "3e-3", "--resume")
    a, b = weights(full / "step-000006"), weights(cut / "step-000006")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in resumed if "loss" in r] == [r["loss"] for r in uninterrupted if "loss" in r]
    assert [r["step"] for r in resumed if "loss" in r] == [1, 2, 3, 4, 5, 6]  # steps 4-6 once each
    assert not (cut / ".tmp-step-000006").exists()
    assert (cut / "final").resolve() == (cut / "step-000006").resolve()


def test_checkpoint_restores_weights_optimizer_and_rng(tmp_path):
    model = tiny_model()
    optimizer = sft.build_optimizer(model, lr=1e-3, weight_decay=0.1)
    model(torch.tensor([[1, 2, 3]])).square().mean().backward()
    optimizer.step()  # AdamW now holds moments and a step count
    sft.seed_all(5)
    path = sft.save_checkpoint(tmp_path, 7, model, optimizer, {"note": 1})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    sft.seed_all(123)

    restored = sft.load_model(path)
    restored_optimizer = sft.build_optimizer(restored, lr=1e-3, weight_decay=0.1)
    assert sft.load_checkpoint(path, restored, restored_optimizer) == {"step": 7, "world_size": 1, "note": 1}
    assert torch.equal(torch.rand(3), expected[0]) and (np.random.rand(3) == expected[1]).all()
    assert random.random() == expected[2]
    for (name, a), b in zip(model.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b.float()), name
    saved, loaded = optimizer.state_dict(), restored_optimizer.state_dict()
    assert saved["param_groups"] == loaded["param_groups"] and saved["state"].keys() == loaded["state"].keys()
    for i, state in saved["state"].items():
        assert all(torch.equal(state[k], loaded["state"][i][k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    assert [p.name for p in sft.latest_checkpoints(tmp_path)] == ["step-000007"]


def test_torchrun_two_processes_match_one(tiny, tmp_path):
    """2 ranks x 1 example per micro-batch x 2 micro-batches == 1 process x 2 micro-batches of 2, also across a
    resume under FSDP (sharded optimizer through DCP, weights broadcast from rank 0). Tied embeddings exercise the
    tie through meta-device sharding."""
    config = tmp_path / "tied.json"
    config.write_text(json.dumps({**TINY, "tie_word_embeddings": True}))
    data = write_jsonl(tmp_path / "d.jsonl", [chat_record(q, a * (i % 3 + 1)) for i, (q, a) in enumerate(QUESTIONS)])
    common = ["--init-config", str(config), "--tokenizer", str(tiny), "--data", str(data), "--batch-size", "4",
              "--lr", "3e-3", "--warmup", "0", "--min-lr-ratio", "1", "--grad-clip", "0.5", "--seed", "3"]
    # Activation checkpointing on the 2-rank run only: recomputing blocks under FSDP must not change a number.
    sft.main(common + ["--out", str(tmp_path / "one"), "--micro-batch-size", "2", "--steps", "4"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                str(ROOT / "sft.py"), *common, "--out", str(tmp_path / "two"), "--micro-batch-size", "1",
                "--activation-checkpointing"]
    for steps in ("2", "4"):  # stop after 2 steps, then resume to 4 (constant lr: the schedule is unaffected)
        result = subprocess.run(torchrun + ["--steps", steps, "--resume"], env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = ([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
                 if '"loss"' in line] for run in ("one", "two"))
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        assert a["units"] == b["units"] and a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)  # catches a gradient scaled by world size
    assert one[0]["grad_norm"] > 0.5  # clipping was active, so the gradient scale matters for the update
    a, b = weights(tmp_path / "one" / "step-000004"), weights(tmp_path / "two" / "step-000004")
    assert a.keys() == b.keys() and "lm_head.weight" not in a
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)


def test_resume_refuses_other_data_and_fresh_runs_refuse_a_used_folder(tiny, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [chat_record(q, a) for q, a in QUESTIONS])
    run_sft(tiny, data, tmp_path / "run", "--steps", "1")
    with pytest.raises(sft.UserError, match="--resume"):
        run_sft(tiny, data, tmp_path / "run", "--steps", "2")
    fewer = write_jsonl(tmp_path / "e.jsonl", [chat_record(q, a) for q, a in QUESTIONS[:6]])
    with pytest.raises(ValueError, match="data position"):
        run_sft(tiny, fewer, tmp_path / "run", "--steps", "2", "--resume")


def test_lora_sft_trains_only_adapters_and_resumes_exactly(tiny, tmp_path):
    """--lora-rank: the loss falls with the base frozen; 2 steps + a resume to 4 (base + saved adapter + AdamW) equal
    4 uninterrupted steps; the checkpoint is the merged model plus adapter/ in PEFT's layout."""
    data = write_jsonl(tmp_path / "d.jsonl", [chat_record(q, a) for q, a in QUESTIONS])
    common = ["--lora-rank", "4", "--lr", "1e-2", "--warmup", "0", "--min-lr-ratio", "1"]
    full = run_sft(tiny, data, tmp_path / "full", *common, "--steps", "4")
    run_sft(tiny, data, tmp_path / "cut", *common, "--steps", "2")
    resumed = run_sft(tiny, data, tmp_path / "cut", *common, "--steps", "4", "--resume")
    losses = [r["loss"] for r in full if "loss" in r]
    assert losses[-1] < losses[0] - 0.1
    assert [r["loss"] for r in resumed if "loss" in r] == losses
    a, b = weights(tmp_path / "full" / "step-000004"), weights(tmp_path / "cut" / "step-000004")
    assert all(torch.equal(a[k], b[k]) for k in a)
    base = init_weights(Transformer(ModelConfig.from_hf(TINY)), seed=3).state_dict()  # --init-config, --seed 3
    for k, v in a.items():
        assert torch.equal(v, base[k.removeprefix("model.")]) == (not k.endswith("proj.weight")), k
    assert (tmp_path / "full" / "step-000004" / "adapter" / "adapter_config.json").is_file()


def master_weights(path):
    """The fp32 master weights a checkpoint's resume state holds."""
    model = sft.load_model(path).float()
    sft.load_checkpoint(path, model, sft.build_optimizer(model, lr=1e-3))
    return model.state_dict()


def test_bf16_source_saves_bf16_that_transformers_loads_and_resumes_exactly(tiny, tmp_path):
    """A bf16 source checkpoint: the saved folders are bf16 (files and config), transformers loads them, training
    ran on fp32 master weights kept in the resume state, and a resumed run ends bitwise where an uninterrupted one
    does. --save-dtype overrides."""
    from transformers import Qwen2ForCausalLM
    source = tmp_path / "source"
    save(tiny_model(seed=2), source, dtype=torch.bfloat16)
    shutil.copyfile(tiny / "tokenizer.json", source / "tokenizer.json")
    data = write_jsonl(tmp_path / "d.jsonl", [chat_record(q, a) for q, a in QUESTIONS])
    run = lambda out, *extra: sft.main(["--model", str(source), "--data", str(data), "--out", str(out),  # noqa: E731
                                        "--batch-size", "4", "--micro-batch-size", "2", "--steps", "2",
                                        "--save-every", "1", "--lr", "3e-3", "--seed", "3", *extra])
    full, cut = tmp_path / "full", tmp_path / "cut"
    run(full)
    folder = full / "step-000002"
    config = json.loads((folder / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    assert {t.dtype for t in weights(folder).values()} == {torch.bfloat16}
    hf = Qwen2ForCausalLM.from_pretrained(folder, dtype="auto")
    assert hf.dtype == torch.bfloat16
    assert torch.equal(hf.model.embed_tokens.weight, weights(folder)["model.embed_tokens.weight"])
    master = master_weights(folder)
    assert {t.dtype for t in master.values()} == {torch.float32}
    assert any(not torch.equal(t, t.bfloat16().float()) for t in master.values())  # fp32, not bf16 in disguise

    shutil.copytree(full, cut, symlinks=True)
    shutil.rmtree(cut / "step-000002")
    run(cut, "--resume")
    a, b = weights(full / "step-000002"), weights(cut / "step-000002")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    resumed = master_weights(cut / "step-000002")
    assert all(torch.equal(master[k], resumed[k]) for k in master)

    run(tmp_path / "fp32", "--save-dtype", "float32")
    assert {t.dtype for t in weights(tmp_path / "fp32" / "step-000002").values()} == {torch.float32}
    assert json.loads((tmp_path / "fp32" / "step-000002" / "config.json").read_text())["torch_dtype"] == "float32"
