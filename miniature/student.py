"""The miniature's student: a tokenizer trained on the exam's corpus, a tiny Qwen2 config, pretraining on kb.txt.

The student is our own model.py Transformer, Qwen2-shaped but tiny, trained from scratch: first on the knowledge
base as plain text (so the knowledge a question needs must be recalled, as a real model recalls medicine from its
pretraining), then by sft.py / dpo.py like a real checkpoint. The tokenizer (Hugging Face `tokenizers`, BPE) keeps
Qwen's special tokens <|endoftext|> <|im_start|> <|im_end|> (templates.special_ids looks them up by name), never
merges findings, disease-name characters, treatments, option letters, digits, punctuation or spaces with anything
(so "热有 咳无" is checked character by character), and lets BPE merge the fixed prompt and template text.

    python miniature/student.py --data runs/mini/data --out runs/mini/student   # tokenizer, config, pretrain.jsonl
    python sft.py --init-config runs/mini/student/config.json --tokenizer runs/mini/student \\
        --data runs/mini/student/pretrain.jsonl --out runs/mini/pretrain --max-len 256 --lr 3e-3 ...
"""
import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import templates  # noqa: E402
from exam import (FINDINGS, ORGANS, PROCESSES, TREATMENTS, competing_findings, knowledge_lines,  # noqa: E402
                  outside_names)
from model import ModelConfig, Transformer  # noqa: E402
from teacher import answer_text, corrupt, critique_text, parse_question, step_critique_text  # noqa: E402

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


def corpus(data_dir, questions=None, seed=0):
    """Every kind of text the student will read or write: the knowledge, student prompts with template and plain
    answers, critique prompts with corrections (for tokenizer.csv's questions, the first `questions` of them), as
    chat text. tokenizer.csv, not train.csv: its rows do not depend on what an arm adds (exam.tokenizer_split)."""
    data_dir = Path(data_dir)
    kb = json.loads((data_dir / "kb.json").read_text(encoding="utf-8"))
    rng = random.Random(seed)
    texts = knowledge_lines(kb, rng)
    for row in templates.load_cmexam(data_dir / "tokenizer.csv")[:questions]:
        q = parse_question(templates.format_question(row))
        student = templates.student_messages(row)
        wrong, _ = corrupt(kb, q, rng)
        for messages in (student + [{"role": "assistant", "content": answer_text(kb, q)}],
                         student + [{"role": "assistant", "content": answer_text(kb, q, "plain")}],
                         templates.critique_messages(row, wrong) + [
                             {"role": "assistant", "content": critique_text(kb, q, wrong)}],
                         templates.step_critique_messages(row, wrong) + [
                             {"role": "assistant", "content": step_critique_text(kb, q, wrong)}]):
            texts.append(templates.chat(messages, add_generation_prompt=False))
    return texts


def train_tokenizer(texts, vocab_size=1024):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    # Pieces never merged with their neighbours: disease names and treatments (each then one token: a student
    # copies a one-token name from the question far more reliably than two characters, measured), findings, option
    # letters, digits, punctuation, whitespace. Without this "肾结的表现有" would become one token, the subject lost.
    names = [organ + process for organ in ORGANS for process in PROCESSES]
    # A run of English (the default system prompt) is one piece, which BPE then merges into a few tokens.
    pattern = r"[A-Za-z][A-Za-z ,.]+[a-z.]|" + "|".join(names + TREATMENTS) + rf"|[{FINDINGS}A-E0-9]|\s|[^\w\s]"
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # concatenate pieces as they are: no spaces inserted, none lost
    alphabet = sorted(set("".join(texts)) | set(chr(c) for c in range(32, 127)) | {"\n"})
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL + ["<unk>"],
                                  initial_alphabet=alphabet, limit_alphabet=len(alphabet), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


# ----------------------------------------------------------------------------------------------------------------
# Model config: Qwen2-shaped (GQA, q/k/v bias, SwiGLU, RoPE, tied head) at about a million parameters


def student_config(tokenizer, hidden=128, layers=4, heads=8, kv_heads=4, context=1024) -> ModelConfig:
    ids = templates.special_ids(tokenizer)
    return ModelConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=hidden, intermediate_size=3 * hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=context, rope_theta=10000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, bos_token_id=ids["endoftext"], eos_token_id=ids["im_end"])


# ----------------------------------------------------------------------------------------------------------------
# Pretraining data for `sft.py --init-config` ({"text"} records train on every token): copies of the knowledge, each
# fact in its canonical line and another phrasing in a random order (exam.knowledge_lines), lines shuffled anew in
# each copy so that no fact is learned from its neighbours' positions. The same text replayed during SFT
# (replay_records) keeps knowledge that no SFT example uses (the G and U diseases) from being erased (measured: entry
# recall 100% after pretraining, 0% after SFT without replay; issue 11).


def noisy_copy(kb, competing, g_noise, rng):
    """kb with each G disease's findings replaced by its competing version with probability g_noise, drawn per
    disease. g_noise 0 draws nothing, so the default's text is the one every earlier run trained on."""
    if not g_noise:
        return kb
    return {**kb, "diseases": {n: {**d, "findings": competing[n]} if n in competing and rng.random() < g_noise else d
                               for n, d in kb["diseases"].items()}}


def pretrain_records(kb, copies, seed=0, g_noise=0.0):
    rng, competing = random.Random(f"pretrain-{seed}"), competing_findings(kb, seed)
    return [{"text": "\n".join(knowledge_lines(noisy_copy(kb, competing, g_noise, rng), rng)) + "\n"}
            for _ in range(copies)]


def replay_records(kb, n, seed=0, lines=24, g_share=1.0, g_noise=0.0):
    """n knowledge snippets of `lines` lines each (~250 tokens), to mix into SFT data: the pretraining corpus's text
    (g_noise as there). g_share < 1 keeps the G diseases' lines in only that share of the snippets (drawn per
    snippet), so that SFT refreshes G knowledge less than T's and U's (README: session 12)."""
    rng, competing = random.Random(f"replay-{seed}"), competing_findings(kb, seed)
    without_g = {**kb, "diseases": {k: d for k, d in kb["diseases"].items() if d["split"] != "G"}}
    # g_share 1 draws nothing extra, so the default's snippets are the ones every earlier run trained on
    snippets = (knowledge_lines(noisy_copy(kb if g_share >= 1 or rng.random() < g_share else without_g, competing,
                                           g_noise, rng), rng) for _ in range(n))
    return [{"text": "\n".join(drawn[:lines]) + "\n"} for drawn in snippets]


def lookup_records(kb, n, seed=0, names=8, salt="lookup"):
    """n in-context lookup documents: `names` diseases outside kb (an int, or (low, high) drawn per document), each
    with 3-4 findings drawn at random, listed in one line as a reading question's stem lists them ("已知：X：a、b、c；
    Y：…。"), then each recited by name on its own line, in a shuffled order. Only the context holds an entry, so
    the recitals train the copy by name that a reading question's reply needs, an in-context skill (an induction
    head's) that a real model brings from pretraining and that the student otherwise has to form inside Stage 1.
    1-5 names formed a lookup that holds for 2, 5 and 8; 2 names alone, one that holds for 2 (README: session 23)."""
    rng = random.Random(f"{salt}-{seed}")
    outside = outside_names(kb)
    records = []
    for _ in range(n):
        count = names if isinstance(names, int) else rng.randint(*names)
        entries = {name: "、".join(sorted(rng.sample(FINDINGS, rng.choice((3, 4))), key=FINDINGS.index))
                   for name in rng.sample(outside, count)}
        listed = "已知：" + "；".join(f"{name}：{entry}" for name, entry in entries.items()) + "。\n"
        records.append({"text": listed + "".join(f"{name}：{entries[name]}\n"
                                                 for name in rng.sample(list(entries), count))})
    return records


def name_count(text):
    """--lookup-names: "5" -> 5, "1-5" -> (1, 5)."""
    low, _, high = text.partition("-")
    return (int(low), int(high)) if high else int(low)


def lookup_accuracy(model_dir, tokenizer, kb, *, n=200, seed=0, names=8) -> float:
    """Share of n held-out lookup documents (lookup_records, another salt) whose first recital the model completes
    right, greedy, from the listed line and "<name>：": is the copy by name formed?"""
    from model import generate, load
    docs = [r["text"].split("\n") for r in lookup_records(kb, n, seed, names, salt="lookup-held-out")]
    prompts = [tokenizer.encode(f"{d[0]}\n{d[1].split('：')[0]}：", add_special_tokens=False).ids for d in docs]
    outputs = generate(load(model_dir), prompts, 12, temperature=0.0)
    return sum(tokenizer.decode(ids).split("\n")[0] == d[1].split("：")[1] for ids, d in zip(outputs, docs)) / n


def recited_findings(model_dir, tokenizer, names, samples=0, temperature=0.7) -> list:
    """The findings the model writes after "<name>：" at the start of a line, out of any question's context, for each
    name: greedy, or `samples` completions at `temperature` each (name-major)."""
    from model import generate, load
    prompts = [tokenizer.encode(f"\n{name}：", add_special_tokens=False).ids for name in names]
    outputs = generate(load(model_dir), prompts, 12, temperature=temperature if samples else 0.0,
                       num_samples=max(1, samples))
    return [tokenizer.decode(ids).split("；")[0] for ids in outputs]


def entry_recall(model_dir, tokenizer, kb, split, samples=0, temperature=0.7) -> float:
    """Share of the `split` diseases (T, G or U) whose canonical knowledge line the model completes right, greedy,
    from "<name>：" at the start of a line: does what pretraining stored survive (SFT without replay erased it)?
    samples > 0: the mean share of `samples` completions at `temperature` that are right, a graded recall that
    sees an entry held in part, which the greedy one rounds to 0 or 1."""
    names = [n for n, d in kb["diseases"].items() if d["split"] == split]
    got = recited_findings(model_dir, tokenizer, names, samples, temperature)
    truth = ["、".join(kb["diseases"][n]["findings"]) for n in names for _ in range(max(1, samples))]
    return sum(g == t for g, t in zip(got, truth)) / max(1, len(truth))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", required=True, help="folder written by miniature/exam.py")
    parser.add_argument("--out", required=True, help="folder for tokenizer.json, config.json, pretrain.jsonl")
    parser.add_argument("--vocab-size", type=int, default=1024, help="at most (BPE stops when no pair repeats)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--copies", type=int, default=400, help="copies of the knowledge in pretrain.jsonl")
    parser.add_argument("--lookups", type=int, default=0,
                        help="in-context lookup documents for lookups.jsonl (lookup_records; 0: no file)")
    parser.add_argument("--lookup-names", type=name_count, default="1-5",
                        help="diseases listed in each lookup document: N, or LOW-HIGH drawn per document")
    parser.add_argument("--lookup-mix", type=int, default=0,
                        help="lookup documents (another draw) added to pretrain.jsonl, to keep the lookup there")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--g-noise", type=float, default=0.0,
                        help="share of the G diseases' statements that give their competing (wrong) findings")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(corpus(args.data, seed=args.seed), args.vocab_size)
    tokenizer.save(str(out / "tokenizer.json"))
    cfg = student_config(tokenizer, args.hidden, args.layers, args.heads, args.kv_heads)
    (out / "config.json").write_text(json.dumps(cfg.to_hf(torch.float32), indent=2) + "\n")
    kb = json.loads((Path(args.data) / "kb.json").read_text(encoding="utf-8"))
    with open(out / "pretrain.jsonl", "w", encoding="utf-8") as f:
        for record in pretrain_records(kb, args.copies, args.seed, args.g_noise) + lookup_records(
                kb, args.lookup_mix, args.seed, args.lookup_names, salt="lookup-mix"):
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    if args.lookups:
        templates.write_jsonl(out / "lookups.jsonl", lookup_records(kb, args.lookups, args.seed, args.lookup_names))
    n = sum(p.numel() for p in Transformer(cfg).parameters())
    print(f"vocab {tokenizer.get_vocab_size()}, {n:,} parameters, {args.copies} copies of the knowledge, "
          f"{args.lookups} lookup documents (+ {args.lookup_mix} in pretrain.jsonl) -> {out}")


if __name__ == "__main__":
    main()
