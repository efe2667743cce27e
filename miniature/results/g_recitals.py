"""Shared by the G-recital analyses (probe_g_noise_recital.py, probe_g_reply_recital.py, probe_g_recital_forms.py):
a seed folder's two versions of each G entry, the recitals of them inside its dev-G samples, and the prompts that
open a reply. Not a script."""
import json
import sys
from pathlib import Path

sys.path[:0] = ["miniature", "."]
import student  # noqa: E402
import templates as T  # noqa: E402

# a 多选 trajectory's own lines up to the recital, the question itself absent (probe_g_reply_recital's reply_prefix)
REPLY_PREFIX = "<think>\n审题：多选，问哪些是其表现。\n提取关键信息：{0}；是其表现者。\n回忆相关知识：\n{0}："


def versions(work):
    """(truth, competing): each G disease's true and competing findings (student.competing_findings), written as
    every trajectory recites them, "、"-joined in canonical order; the seed is the folder's name's (seed_N)."""
    work = Path(work)
    kb = json.loads((work / "data" / "kb.json").read_text(encoding="utf-8"))
    competing = {n: "、".join(v) for n, v in student.competing_findings(kb, int(work.name.split("_")[-1])).items()}
    return {n: "、".join(kb["diseases"][n]["findings"]) for n in competing}, competing


def dev_g_recitals(work, names):
    """(name, findings) for every line of the dev-G samples that recites one of `names` after "<name>：", the
    findings up to "；" or the line's end."""
    for record in T.read_jsonl(Path(work) / "dev_samples" / "round_1" / "samples.jsonl"):
        for sample in record["samples"]:
            for line in sample["text"].split("\n"):
                for name in names:
                    if name + "：" in line:
                        yield name, line.split(name + "：", 1)[1].split("；")[0]


def prompt_ids(tokenizer, template, reply):
    """The ids of a chat template and the opening of the assistant's reply, tokenized apart as encode_chat does in
    training (one encode of the joined text could merge pieces across the boundary)."""
    return [i for text in (template, reply) for i in tokenizer.encode(text, add_special_tokens=False).ids]
