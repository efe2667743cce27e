"""templates.py: every text format of MedCritical (Su et al., arXiv 2509.23368), and Stage 1's teacher.

The Qwen2.5-Instruct chat template and the SFT label mask; CMExam (Liu et al., NeurIPS 2023) and the question as the
student sees it; answer extraction, which decides every accuracy number; Stage 1's high-level and detailed templates
that guide the teacher; Stage 2's self-critique prompt; the conventions every script shares (one-line errors,
checked arguments, output locks, resumable JSONL); and an OpenAI-compatible teacher client with the `distill`
command, which keeps only the teacher's trajectories that reach the gold answer. Standard library only, besides
model.UserError (one error class for all six scripts) and tqdm (distill's progress bar).

    python templates.py distill --data train.csv --out sft.jsonl --base-url http://127.0.0.1:8000 --model QwQ-32B
    python templates.py show --data val.csv --index 0      # print every prompt built for one question
"""
import argparse
import csv
import ctypes
import dataclasses
import fcntl
import http.client
import io
import itertools
import json
import logging
import os
import queue
import random
import re
import signal
import sys
import threading
import time
import unicodedata
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path

from model import UserError  # one class: templates.UserError is model.UserError

log = logging.getLogger("templates")

# ----------------------------------------------------------------------------------------------------------------
# Chat template: Qwen2.5-Instruct without tools (Qwen-Qwen2.5-7B-Instruct.jinja)

DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 151643, 151644, 151645  # the real Qwen2.5 ids; see special_ids()
STOP_IDS = (IM_END_ID, ENDOFTEXT_ID)


def _chat_pieces(messages, add_generation_prompt):
    """The chat text as (text, trained) pieces: chat() joins them, encode_chat() tokenizes them one by one."""
    if not messages:
        raise ValueError("chat needs at least one message")
    pieces = []
    if messages[0]["role"] != "system":
        pieces.append((f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n", False))
    for m in messages:
        if m["role"] not in ("system", "user", "assistant") or m.get("tool_calls"):
            raise ValueError(f"role {m['role']!r} / tool calls: only the tool-free template is implemented")
        if m["role"] == "assistant":  # the reply and its <|im_end|> are learned; the "\n" after it is template
            pieces += [("<|im_start|>assistant\n", False), (m["content"] + "<|im_end|>", True), ("\n", False)]
        else:
            pieces.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
    if add_generation_prompt:
        pieces.append(("<|im_start|>assistant\n", False))
    return pieces


def chat(messages, add_generation_prompt=True) -> str:
    """Exactly what transformers' apply_chat_template(messages, tokenize=False) renders for Qwen2.5-Instruct."""
    return "".join(text for text, _ in _chat_pieces(messages, add_generation_prompt))


def special_ids(tokenizer) -> dict:
    """{'im_start', 'im_end', 'endoftext'} -> id, looked up in `tokenizer` (a miniature one has other ids)."""
    ids = {name: tokenizer.token_to_id(f"<|{name}|>") for name in ("im_start", "im_end", "endoftext")}
    if None in ids.values():
        raise ValueError(f"tokenizer lacks Qwen's special tokens: {ids}")
    return ids


def stop_ids(tokenizer) -> tuple:
    """The ids a reply ends on, end of turn then end of text: STOP_IDS for Qwen's tokenizer, others for a miniature
    or test tokenizer (so never STOP_IDS itself where the tokenizer is at hand)."""
    ids = special_ids(tokenizer)
    return ids["im_end"], ids["endoftext"]


def encode_chat(tokenizer, messages):
    """Token ids of chat(messages, add_generation_prompt=False) and a same-length list of bools, True exactly on
    the tokens of every assistant message's content and its closing <|im_end|> (mask[i]: ids[i] is a target,
    predicted from ids[:i]; the caller shifts). Tokenized piece by piece (template / assistant output), the prompt
    part alone as at inference: this equals tokenizing the whole text in one go except when a reply begins with a
    line break (after optional spaces), which Qwen's pre-tokenizer would merge with the "\\n" after "assistant"
    into a token the model can never produce after the prompt."""
    ids, mask = [], []
    for trained, group in itertools.groupby(_chat_pieces(messages, False), key=lambda piece: piece[1]):
        piece_ids = tokenizer.encode("".join(text for text, _ in group), add_special_tokens=False).ids
        ids += piece_ids
        mask += [trained] * len(piece_ids)
    return ids, mask


def reply_text(tokenizer, new_ids, head=()) -> tuple:
    """(text, finished) of a sampled reply: finished = it ended with a stop id (the model stopped itself rather than
    being cut off), which is then not part of the text. `head`: ids decoded in front (a reply continued mid-line
    decodes whole). Special tokens inside the reply are kept, so a stray <|im_start|> is seen, not hidden."""
    finished = bool(new_ids) and new_ids[-1] in stop_ids(tokenizer)
    ids = list(head) + list(new_ids[:-1] if finished else new_ids)
    return tokenizer.decode(ids, skip_special_tokens=False), finished


# ----------------------------------------------------------------------------------------------------------------
# CMExam: official CSV (Question, Options, Answer, Explanation [+ 5 annotation columns in test]), JSON, JSONL

LETTERS = "ABCDE"
REQUIRED_COLUMNS = {"question": "Question", "options": "Options", "answer": "Answer"}  # ours: official
_OPTION_LINE = re.compile(r"([A-Ea-eＡ-Ｅａ-ｅ])(?:\s+|\s*[.．、:：)）]\s*)(\S.*)")  # "A 角膜", "B. 房水"


def _letter(raw):
    return unicodedata.normalize("NFKC", str(raw)).strip().upper()


def _parse_options(value):
    if isinstance(value, dict):  # our own JSONL, already parsed
        options = {_letter(k): str(v).strip() for k, v in value.items()}
    else:  # one string, one option a line; some copies of CMExam have a literal "\n" instead of newlines
        lines = value if isinstance(value, list) else str(value or "").replace("\\n", "\n").splitlines()
        options = {}
        for line in filter(None, (str(line).strip() for line in lines)):
            m = _OPTION_LINE.fullmatch(line)
            if not m or _letter(m[1]) in options:
                raise ValueError(f"unparseable options (line {line[:20]!r})")
            options[_letter(m[1])] = m[2].strip()
    if not options:
        raise ValueError("no options")
    if not set(options) <= set(LETTERS) or not all(options.values()):
        raise ValueError(f"unparseable options {sorted(options)}")
    return dict(sorted(options.items()))


def _parse_answer(value):
    text = unicodedata.normalize("NFKC", "" if value is None else str(value)).strip()
    if text.lower() in ("", "nan", "none", "null"):  # pandas writes a missing answer as "nan"
        raise ValueError("no answer")
    letters = re.sub(r"[\s,、;]", "", text).upper()
    if not re.fullmatch(r"[A-E]+", letters):
        raise ValueError(f"invalid answer {text!r}")
    return "".join(sorted(set(letters)))


def _read_records(path):
    """[(where, record dict or None)] and the column names, from a .csv, .json (a list) or .jsonl file."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json", ".jsonl"):
        raise UserError(f"{path}: a CMExam file must end in .csv, .json or .jsonl (convert it, or rename it if it "
                        "is one of them)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 (byte {e.start}); CMExam files are UTF-8: convert it, e.g. "
                        f"iconv -f GBK -t UTF-8 {path} > utf8{path.suffix}") from None
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        records, line = [], 2
        for record in reader:  # a record spans several lines (the options), so name the one it starts on
            records.append((f"line {line}", record))
            line = reader.line_num + 1
        return records, list(reader.fieldnames or [])
    if suffix == ".jsonl":
        records = [(f"line {i}", _json_or_none(line)) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}:{e.colno}: not JSON ({e.msg}); a .json file holds one list of "
                            "questions (one question a line is .jsonl)") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of questions")
        records = [(f"item {i}", record) for i, record in enumerate(data)]
    return records, sorted({k for _, record in records if isinstance(record, dict) for k in record})


def _json_or_none(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _take(record, key):
    """Pop a field under our name or the official one (question / Question)."""
    ours, official = record.pop(key, None), record.pop(REQUIRED_COLUMNS[key], None)
    return ours if ours is not None else official


def _make_row(record, index):
    if not isinstance(record, dict):
        raise ValueError("invalid JSON" if record is None else "not a JSON object")
    record = dict(record)
    question = str(_take(record, "question") or "").strip()
    options, answer = _take(record, "options"), _take(record, "answer")
    if not question:
        raise ValueError("empty question")
    options, answer = _parse_options(options), _parse_answer(answer)
    if not set(answer) <= set(options):
        raise ValueError(f"answer {answer} not among options {''.join(options)}")
    return {"id": record.pop("id", index), "question": question, "options": options, "answer": answer, **record}


def load_cmexam(path, return_skipped=False):
    """CMExam questions as dicts: id (the file's own, else the 0-based record index), question, options
    {letter: text}, answer (sorted letters), and every other column under its original name. Unusable rows are
    skipped with a warning naming their line and reason; return_skipped=True also returns [(where, reason)]."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"CMExam file not found: {path}")
    records, columns = _read_records(path)
    missing = [official for ours, official in REQUIRED_COLUMNS.items()
               if ours not in columns and official not in columns]
    if missing:
        raise UserError(f"{path}: missing required column(s) {missing}; it has {columns}")
    rows, skipped = [], []
    for index, (where, record) in enumerate(records):
        try:
            rows.append(_make_row(record, index))
        except ValueError as e:
            skipped.append((where, str(e)))
            log.warning("%s %s: skipped, %s", path, where, e)
    if skipped:
        log.warning("%s: %d of %d rows skipped", path, len(skipped), len(records))
    return (rows, skipped) if return_skipped else rows


# ----------------------------------------------------------------------------------------------------------------
# Answer extraction: the final answer as a careful grader reads it. Matching runs on NFKC text, so full-width
# letters, colons and brackets become ASCII. Candidates are explicit answer statements ("strong": 答案：X, 【答案】X,
# 答：X, Answer: X, JSON "answer", \boxed{X}, 正确选项为X, 答案不是A而是B) and choices ("weak": 故选X, 应选X),
# which explanations also use for other things ("易误选A", "首选B超"). The last candidate wins, except that after
# the last answer LINE (a strong statement that starts its line) only strong statements count: the explanation a
# model writes after "答案：B" does not override it, a restated answer does. Not candidates: a hedge ("A或B", "A还是B"
# yields no answer), a conditional ("如果……则应选D"), the format example echoed ("如“答案：AC”"), a negated choice
# ("不选A", "误选A"), a letter that begins a word (B超, A型, C反应蛋白). The <think> block gets no special
# treatment: a final answer after </think> is later, so it wins; without one, the reasoning's last conclusion is the
# best reading there is. A letter where the model gave none is worse than a miss, so every rule errs towards "".

_STRONG = "|".join([
    r"(?<!原)(?<!错误)(?<!错误的)(?<!误选)(?<!误选择)答案\**\s*[】\]」』]?\s*(?:应该?是|应该?为|应选|就是|是|为|选)?\s*(?:选项)?",
    r"答案\s*并?不是[^。\n]{0,20}?而(?:应该?)?(?:是|为|选)",  # 答案不是A，而是B
    r"正确(?:选项|的选项|的是)\s*(?:应该?是|应该?为|是|为)?",
    r"(?<![\u4e00-\u9fff])答\s*(?=:)",  # 答：C, but not 回答/解答
    r"(?i:(?:correct|right|best)\s+(?:option|choice)s?)\s*(?:(?i:is|are)\b)?",  # The correct option is B
    r"(?i:answer)[\"']?\s*(?:(?i:is)\b)?\s*(?:(?i:option|choice)\b)?",  # Answer: / the answer is / "answer": "C"
    r"<answer>",
    r"\\boxed\{(?:\\(?:text|textbf|mathrm|mathbf)\{)?",
])
_WEAK = r"(?<!不)(?<!未)(?<!误)(?<!错)(?<!勿)(?<!不能)(?<!不应)(?<!不可)(?<!不宜)(?<!不该)(?<!不应该)选择?(?!项)"
_LETTER = r"[A-Ea-e](?:项|选项)?"
_ANSWER = re.compile(
    rf"(?:(?P<strong>{_STRONG})|(?P<weak>{_WEAK}))\**\s*:?\s*[(\[【\"“'*「『]*\s*"
    rf"(?P<letters>{_LETTER}(?:(?:\s*[、和及与/&]\s*|\s+and\s+|\s*)[A-Ea-e]项?"  # AC, A、C, A项和C项, A and C
    r"|\s*[,;]\s*[A-Ea-e](?!\s*(?:选?项|[是为错对正不均都也可的])))*)"  # "A,C", "A;C" yet not "C,D项错误"
    r"(?P<hedge>\s*[,(]?\s*(?:或者?|还是|抑或|(?i:or)\b)\s*[(\[\"“'「]?\s*[A-Ea-e]+(?![A-Za-z]))?"  # A或B: no answer
    r"(?![A-Za-z])(?!\s*[吗?])(?!-?(?:超|型|族|细胞|群|肽|反应蛋白|二聚体|受体))"  # not a word, not a question
    r"(?![错对])(?!\s*(?:不是|错误|不对|不正确))")  # not an option's mark ("首选(C错)"), not "答案A不是……"
_LINE_START = re.compile(r"[\s*#>\-•·$【\[(]*(?:(?:最终|最后|正确|参考|标准)的?|(?i:final|the|my|correct)\s+)*")
_CONDITION = re.compile(r"(?:如果|假如|倘若|假设|要是|否则|(?<!如)若(?!干)|(?i:\bif\b))"  # unless a conclusion follows
                        r"(?!.*(?:故|因此|所以|综上|总之|(?i:\bso\b|therefore)))")
_ECHO = re.compile(r"(?:如|例如|比如|格式为?|格式是|写成|写作|形如)\s*[“\"「『'‘(]?\s*$")


def extract_answer(text) -> str:
    """Sorted unique letters of the final answer in a model output, "" if there is none (rules above)."""
    text = unicodedata.normalize("NFKC", text or "")
    candidates = []  # (answer, strong, starts its line)
    for m in _ANSWER.finditer(text):
        letters = re.sub(r"\s+and\s+", "、", m["letters"])
        if not letters.isupper():  # lower case only as separate letters, never a word ("is bad", "is a good")
            words = any(len(run) > 1 for run in re.findall(r"[A-Ea-e]+", letters))
            if words or re.match(r"\s+[A-Za-z]", text[m.end():]):
                continue
        if re.fullmatch(r"答案", m["strong"] or "") and re.match(r"[\u4e00-\u9fff]", text[m.end():]):
            continue  # "答案E固定连接体……": a bare 答案 and a letter running into prose names an option, not the answer
        line = text[text.rfind("\n", 0, m.start()) + 1:m.start()]
        sentence = re.split(r"[。!?;\n]", text[:m.start()])[-1]
        if _ECHO.search(line) or _CONDITION.search(sentence):
            continue
        answer = "" if m["hedge"] else "".join(sorted(set(re.sub(r"[^A-E]", "", letters.upper()))))
        strong = m["strong"] is not None
        candidates.append((answer, strong, strong and _LINE_START.fullmatch(line) is not None))
    lines = [i for i, (_, _, at_line_start) in enumerate(candidates) if at_line_start]
    if lines:
        candidates = candidates[:lines[-1] + 1] + [c for c in candidates[lines[-1] + 1:] if c[1]]
    return candidates[-1][0] if candidates else ""


def merge_think(text) -> str:
    """One <think> block from a reply with several. A reasoning teacher (QwQ) opens <think> itself, so the prompt's
    own instruction to reason inside <think>...</think> can leave two openings (nested) or two blocks in a row, and a
    server's reasoning field put back into tags adds another. Everything before the last </think> is the reasoning:
    the tags inside it are dropped. A reply with at most one opening and one closing is returned unchanged."""
    if text.count("<think>") <= 1 and text.count("</think>") <= 1:
        return text
    head, closing, tail = text.rpartition("</think>")
    if not closing:  # several openings and no closing: cut off inside the reasoning, left malformed
        return text
    return "<think>\n" + re.sub(r"(?:\s*</?think>\s*)+", "\n\n", head).strip() + "\n</think>" + tail


def is_well_formed(text) -> bool:
    """Our output format: one <think>...</think> block first, then an explicit answer after it."""
    text = text.strip()
    return (text.startswith("<think>") and text.count("<think>") == 1 and text.count("</think>") == 1
            and extract_answer(text.split("</think>")[1]) != "")


# ----------------------------------------------------------------------------------------------------------------
# Stage 1 prompts: the question as the student sees it, the high-level and detailed templates, the teacher prompt

def format_question(row) -> str:
    kind = "多项选择题（有两个或两个以上正确选项）" if len(row["answer"]) > 1 else "单项选择题（只有一个正确选项）"
    options = "\n".join(f"{letter}. {text}" for letter, text in sorted(row["options"].items()))
    return f"以下是一道{kind}。\n\n{row['question']}\n{options}"


OUTPUT_FORMAT = ("请先在<think>和</think>之间写出完整的推理过程，然后在</think>之后用一两句话总结依据，"
                 "最后一行写“答案：X”，X为正确选项的字母（多选题按字母顺序连写，如“答案：AC”）。")


def student_messages(row):
    """The question as the student sees it at training (SFT records) and at inference: no templates, no hint."""
    return [{"role": "user", "content": f"{format_question(row)}\n\n{OUTPUT_FORMAT}"}]


def _hint(hint_answer):  # the gold answer, shown only when a caller passes it explicitly (and records that)
    return (f"\n\n提示：本题的正确答案是{hint_answer}。请像独立解题一样写出完整推理，推理中不要提及这个提示。"
            if hint_answer else "")


def teacher_messages(row, hint_answer=None):
    """Stage 1 teacher prompt: the high-level template, the detailed template, then the question."""
    return [{"role": "user", "content": (
        f"你是一位经验丰富的临床医学专家，请为下面的医学考试题写出严谨、完整的推理过程。\n\n{HIGH_LEVEL_TEMPLATE}\n\n"
        f"下面是一个按此结构解答的示例：\n\n{DETAILED_TEMPLATE}\n\n现在请用同样的结构和格式解答这道题：\n\n"
        f"{format_question(row)}{_hint(hint_answer)}\n\n{OUTPUT_FORMAT}")}]


HIGH_LEVEL_TEMPLATE = """\
请在<think>和</think>之间按以下结构推理：
1. 审题：明确题目问的是什么（诊断、病因、机制、检查、治疗或法规），是单选题还是多选题。
2. 提取关键信息：列出题干中的人群特征、起病时间、症状、体征、检查结果等关键信息。
3. 回忆相关知识：回忆与之相关的定义、发病机制、诊断标准、鉴别要点和治疗原则。
4. 逐项分析各选项：对每个选项逐一判断对错，并说明依据；多选题要判断每个选项是否都应选。
5. 自我检查与纠正：回头核对有无遗漏的信息、错误的知识或前后矛盾，发现错误立即纠正。
6. 得出结论：综合以上分析确定答案。"""

EXEMPLAR = {"answer": "B", "options": dict(zip(LETTERS, [
    "稳定型心绞痛", "急性前壁心肌梗死", "急性下壁心肌梗死", "急性心包炎", "主动脉夹层"])),
    "question": "患者，男，58岁。突发胸骨后压榨性疼痛2小时，伴大汗、恶心，含服硝酸甘油不能缓解。既往高血压病史10年。"
                "心电图示V3～V5导联ST段弓背向上抬高。最可能的诊断是"}

EXEMPLAR_SOLUTION = """\
<think>
审题：这是一道单项选择题，问最可能的诊断，需要结合症状特点和心电图定位来判断。

提取关键信息：中老年男性，高血压病史10年；突发胸骨后压榨性疼痛，已持续2小时，伴大汗、恶心；含服硝酸甘油不能缓解；\
心电图V3～V5导联ST段弓背向上抬高。

回忆相关知识：急性ST段抬高型心肌梗死表现为持续30分钟以上的剧烈胸痛，休息和含服硝酸甘油不能缓解，常伴大汗、恶心，\
梗死相关导联ST段弓背向上抬高。定位：V1～V3为前间壁，V3～V5为前壁，V1～V5为广泛前壁，Ⅱ、Ⅲ、aVF为下壁。\
心绞痛发作一般3～5分钟，含服硝酸甘油可缓解，发作时ST段多压低。急性心包炎的胸痛与呼吸、体位有关，\
心电图为除aVR外广泛导联ST段弓背向下抬高。主动脉夹层为突发撕裂样剧痛，常放射至背部，两上肢血压可不对称。

逐项分析各选项：
A. 稳定型心绞痛：疼痛持续2小时、硝酸甘油无效，ST段抬高而非压低，不符合。
B. 急性前壁心肌梗死：持续压榨性胸痛、大汗、硝酸甘油无效，V3～V5导联ST段弓背向上抬高，符合，定位在前壁。
C. 急性下壁心肌梗死：下壁梗死的改变在Ⅱ、Ⅲ、aVF导联，本题为V3～V5，定位不符。
D. 急性心包炎：ST段抬高应为广泛导联且弓背向下，本题为局限导联弓背向上，不符合。
E. 主动脉夹层：题干没有撕裂样疼痛、背部放射或两上肢血压差，夹层一般也不引起局限的ST段抬高，不符合。

自我检查与纠正：起初我考虑过E，因为高血压是主动脉夹层的危险因素。但夹层累及冠状动脉开口时多累及右冠状动脉，\
表现为下壁而不是前壁心肌梗死，疼痛性质也不符，所以排除E。再核对定位：V3～V5对应前壁而非下壁，C也排除。结论与推理一致。

得出结论：最可能的诊断是急性前壁心肌梗死。
</think>
持续压榨性胸痛、硝酸甘油无效，V3～V5导联ST段弓背向上抬高，符合急性前壁心肌梗死。
答案：B"""

DETAILED_TEMPLATE = f"【示例题目】\n{format_question(EXEMPLAR)}\n\n【示例解答】\n{EXEMPLAR_SOLUTION}"


# ----------------------------------------------------------------------------------------------------------------
# Stage 2 prompts: the self-critique of a wrong trajectory, its Step-DPO form, and what a kept text must not say

CORRECTION_MARK = "【修正后的解答】"


def critique_messages(row, wrong_trajectory, hint_answer=None):
    """Stage 2: the model reads its own wrong trajectory, finds the error, then writes a complete new solution
    after CORRECTION_MARK; extract_correction() cuts that out as an answer to the plain student prompt."""
    return [{"role": "user", "content": (
        f"{format_question(row)}\n\n下面是你之前对这道题的解答：\n【原解答】\n{wrong_trajectory.strip()}\n【原解答结束】\n\n"
        f"这个解答的最终答案是错误的。{_hint(hint_answer).strip()}\n请先逐步检查原解答的每一步，指出错误出在哪一步、错在哪里"
        f"（知识错误、遗漏或误读关键信息、选项分析错误，或结论与推理不一致）。\n然后另起一行写“{CORRECTION_MARK}”，"
        f"在其后写出一份完整、独立的正确解答：保留原解答中正确的推理，改正出错的步骤；它将单独作为这道题的解答使用，"
        f"因此不要提及原解答或本次检查。{OUTPUT_FORMAT}")}]


def extract_correction(text) -> str:
    """The corrected solution after the last CORRECTION_MARK of a critique output, "" if it has none."""
    parts = re.split(r"【\s*修正后的解答\s*】[:：]?", text)
    return parts[-1].strip() if len(parts) > 1 else ""


FIRST_WRONG_LINE = "首错行"


def step_critique_messages(row, trajectory, hint_answer=None):
    """Stage 2 with `selfplay.py --correction step` (Step-DPO): the model reads its own wrong trajectory, its lines
    numbered from 1 as `trajectory.split("\\n")` counts them, checks them in order and names the first wrong one
    on a last line "首错行：N", after its reasoning (no answer is stated: the rewrite happens in the student's own
    reply, from that line on; extract_first_wrong_line() reads N)."""
    numbered = "\n".join(f"{n}| {line}" for n, line in enumerate(trajectory.split("\n"), 1))
    return [{"role": "user", "content": (
        f"{format_question(row)}\n\n下面是你之前对这道题的解答，每行前是行号：\n【原解答】\n{numbered}\n【原解答结束】\n\n"
        f"这个解答的最终答案是错误的。{_hint(hint_answer).strip()}\n请从第一行起逐行检查，找出第一处出错的行（知识错误、"
        f"误读关键信息、选项分析错误，或结论与推理不一致）。先写检查过程，最后一行写“{FIRST_WRONG_LINE}：N”，N为该行的行号。")}]


def extract_first_wrong_line(text):
    """N of the last "首错行：N" in a step critique, None if there is none."""
    found = re.findall(rf"{FIRST_WRONG_LINE}\s*[:：]\s*(\d+)", unicodedata.normalize("NFKC", text or ""))
    return int(found[-1]) if found else None


# A kept text (an SFT trajectory, a chosen correction) is trained as the answer to the plain student prompt, so it
# must not refer to what only its own prompt showed: the original solution and the check (critique_messages), the
# exemplar (teacher_messages) or, where one was shown, the hint (_hint). The phrases are the prompts' own words and
# the ways a model echoes them; medical text uses 提示 ("indicates") and 检查 ("examination") all the time, so those
# count only in the forms below.
PROMPT_REFERENCES = ("原解答", "原答案", "原来的解答", "原来的答案", "之前的解答", "之前的答案", "上述解答", "本次检查",
                     "最终答案是错误的", "示例")
HINT_REFERENCES = ("提示:", "题目提示", "根据提示", "按照提示", "结合提示", "提示中", "提示的答案", "提示答案", "这个提示",
                   "该提示", "本题的正确答案", "正确答案是", "正确答案为", "已知答案", "给定的答案", "独立解题")


def prompt_reference(text, hinted=False) -> str:
    """The first phrase of `text` that refers to the prompt (HINT_REFERENCES too if a hint was shown), "" if none."""
    text = unicodedata.normalize("NFKC", text)
    return next((p for p in PROMPT_REFERENCES + (HINT_REFERENCES if hinted else ()) if p in text), "")


# ----------------------------------------------------------------------------------------------------------------
# Runs, shared by all six scripts: one-line errors for bad input (UserError), arguments checked at parse time, one
# writer per output, workers that die with their launcher, and resumable JSONL outputs.


def die(message, code=2):
    """`error: <what, where, what to do>` on stderr and exit `code`. Under torchrun rank 0 says it: the other ranks
    wait first, since most errors strike every rank and torchrun stops them all once rank 0 has exited; a rank
    still alive after the wait had an error of its own and says so."""
    rank = int(os.environ.get("RANK", "0"))
    if rank:
        time.sleep(5)
    print(f"error: {message}" if not rank else f"error (rank {rank}): {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def run_main(main):
    """A script's entry point: UserError -> one line and exit 2, Ctrl-C -> one line and exit 130."""
    try:
        main()
    except UserError as e:
        die(str(e))
    except KeyboardInterrupt:
        die("interrupted; everything already written is kept (run the same command again to continue)", 130)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every default and keeps the description's line breaks (its example commands)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (`error: argument --limit: ...`, exit 2), printed on rank 0 only."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message):
        die(f"{message} (see {self.prog} --help)")


def checked(kind, low, high=None, low_open=False):
    """An argparse type: a `kind` (int or float) in [low, high], or (low, high] with low_open. A count of 0 or -1
    would otherwise silently drop data (`rows[:-1]`) or crash deep in a stack."""
    def parse(text):
        value = kind(text)  # not a number: argparse reports "invalid <kind> value"
        if value < low or (low_open and value == low) or (high is not None and value > high):
            bound = f"> {low}" if low_open else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}{'' if high is None else f' and <= {high}'}, not {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


positive_int, nonnegative_int = checked(int, 1), checked(int, 0)
positive_float, nonnegative_float = checked(float, 0, low_open=True), checked(float, 0)
probability = checked(float, 0, 1, low_open=True)

_LOCKS = {}  # lock file -> the open file holding its flock, kept for this process's lifetime


def lock_output(path):
    """Make this process the only writer of a run's output (a folder: <path>/.lock; a file: <path>.lock) until it
    exits; a second run stops at once with the holder's PID. An flock, which the kernel releases when its holder
    dies however it dies (kill -9 included), so a killed run's lock is simply taken over; the PID file left behind
    means nothing by itself. Asking again for a lock this process holds is a no-op (several mains in one process).
    Under torchrun call it on rank 0 only."""
    path = Path(path)
    lock = path / ".lock" if path.is_dir() else path.with_name(path.name + ".lock")
    key = str(lock.resolve())
    if key in _LOCKS:
        return _LOCKS[key]
    lock.parent.mkdir(parents=True, exist_ok=True)
    f = open(lock, "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().split(maxsplit=1) or ["?", "?"]
        f.close()
        raise UserError(f"{path} is in use by PID {holder[0]} (started {holder[-1].strip()}); wait for it or stop "
                        "it, or choose another output") from None
    f.truncate(0)
    f.write(f"{os.getpid()} {time.strftime('%Y-%m-%d %H:%M:%S %Z')}: {' '.join(sys.argv)[:200]}\n")
    f.flush()
    _LOCKS[key] = f
    return f


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Looked up here, before any fork: a subprocess preexec_fn should not load libraries.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
_PARENT_AT_IMPORT = os.getppid()


def die_with_parent(parent_pid=None):
    """Linux: have the kernel send this process SIGTERM when its parent dies (prctl PR_SET_PDEATHSIG), so that a
    torchrun worker or selfplay's DPO run never outlives a killed launcher as an orphan still writing the run's
    folder. If the parent (`parent_pid`, by default this process's parent when this file was imported) died before
    the call, the race prctl(2) warns of, this process ends now. Elsewhere a no-op. Usable as a subprocess
    preexec_fn (it survives exec)."""
    if _PRCTL is None:
        return
    _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != (parent_pid or _PARENT_AT_IMPORT):
        os.kill(os.getpid(), signal.SIGTERM)


def daemon_pool(workers):
    """submit(fn, *args) -> Future, run by `workers` daemon threads; submit(None) ends them. Unlike a
    ThreadPoolExecutor's threads, daemon threads do not hold up the exit of a stopped run (Ctrl-C, a fatal teacher
    error) while requests are in flight, which can last --timeout seconds each."""
    tasks = queue.SimpleQueue()

    def work():
        while (task := tasks.get()) is not None:
            fn, args, future = task
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as e:  # noqa: B036 -- handed to whoever waits on the future
                    future.set_exception(e)

    for _ in range(workers):
        threading.Thread(target=work, daemon=True).start()

    def submit(fn, *args):
        if fn is None:
            for _ in range(workers):
                tasks.put(None)
            return None
        future = Future()
        tasks.put((fn, args, future))
        return future
    return submit


# Resumable outputs (distill here; eval_cmexam.py and selfplay.py too): every record is appended and synced as it is
# made, and a restarted run skips the ids already written.


def append_jsonl(f, record):
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())  # a killed run loses at most the records in flight, never a written one


def write_jsonl(path, items):
    """Replace a JSONL file atomically: a kill leaves the old file or the new one, never half of either."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items), "utf-8")
    os.replace(tmp, path)


def read_jsonl(path) -> list:
    """The records of a JSONL output, [] if there is none. A last line cut off by a kill is truncated away first,
    so the file is whole JSONL again for the appends of a resumed run."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        log.warning("%s: dropping a partial last line left by an interrupted run", path)
        data = data[:data.rfind(b"\n") + 1]
        with open(path, "r+b") as f:
            f.truncate(len(data))
    records = []
    for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if line.strip():
            records.append(_json_or_none(line))
            if not isinstance(records[-1], dict):
                raise UserError(f"{path}:{n}: not a record of this run (corrupt, or written by something else), so "
                                f"it cannot be resumed; delete that line (sed -i '{n}d' {path}) or use another --out")
    return records


def done_ids(path, records=None) -> set:
    """Ids already in a JSONL output: its `records` if the caller has read them, else read_jsonl(path) (which
    repairs a torn last line first)."""
    records = read_jsonl(path) if records is None else records
    for n, record in enumerate(records, 1):
        if "id" not in record:
            raise UserError(f"{path}: record {n} has no id, so it is not a record of this run; use another --out")
    return {record["id"] for record in records}


def check_unique_ids(rows, source):
    """Outputs are keyed by question id (resume, merge, scoring), so two questions with one id would be lost."""
    if len({row["id"] for row in rows}) != len(rows):
        raise UserError(f"{source}: question ids are not unique, so a run could not resume or be scored")


def check_settings(path, settings, write=True):
    """Refuse to resume a run with settings other than those it was started with (a file of two runs' outputs
    would be neither). The first run writes them under a temporary name and renames it (atomic): processes started
    together see no file or a whole one, never the half-written file that made 8 shards crash 1 time in 10."""
    path = Path(path)
    if path.exists():
        old = json.loads(path.read_text())
        changed = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        changed.update({k: (v, None) for k, v in old.items() if k not in settings})
        if changed:
            raise UserError(f"{path.parent} was started with other settings (was, now): {changed}; use another --out")
    elif write:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(settings, indent=2) + "\n")
        os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# Teacher client: any OpenAI-compatible /v1/chat/completions (vLLM, DeepSeek, OpenAI), standard library only


@dataclasses.dataclass
class TeacherConfig:
    base_url: str = "http://127.0.0.1:8000"  # with or without a trailing /v1
    model: str = "QwQ-32B"
    temperature: float = 0.5  # the authors' sampling for QwQ-32B
    top_p: float = 0.9
    max_tokens: int = 8192  # long chains of thought; a truncated one has no answer and is graded wrong
    timeout: float = 600.0  # per socket operation; not streamed, so a whole generation must fit in it
    max_retries: int = 5
    concurrency: int = 8  # requests in flight
    backoff_base: float = 2.0  # retry k waits about backoff_base * 2**k seconds, x0.5-1.5 jitter
    backoff_max: float = 60.0
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from here at each request, never stored or logged
    max_connection_failures: int = 8  # this many requests in a row that cannot connect stop the run


def teacher_arg_type(field):
    """The argparse type of a TeacherConfig field: counts >= 1 (retries >= 0), a timeout > 0, top_p in (0, 1]."""
    special = {"max_retries": nonnegative_int, "timeout": positive_float, "top_p": probability}
    return special.get(field.name) or {int: positive_int, float: nonnegative_float}.get(type(field.default), str)


class TeacherError(Exception):
    def __init__(self, kind, detail="", retry_after=None):
        super().__init__(f"{kind} {detail}".strip())
        self.kind, self.retry_after = kind, retry_after


class TeacherFatal(UserError):
    """The whole run must stop: the key was refused or cannot be sent, the server cannot be reached, or the run's
    stop event was set. Not a TeacherError, so no per-question handler swallows it."""


@dataclasses.dataclass
class TeacherRun:
    """What one run's concurrent requests share: `stop` ends them all (before the next attempt or during backoff),
    and the count of consecutive requests that could not connect."""
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    reason: str = ""  # why it stopped, if a request stopped it
    connection_failures: int = 0
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def halt(self, reason) -> TeacherFatal:
        """Stop every request of the run, with the first reason given; the TeacherFatal to raise."""
        with self.lock:
            self.reason = self.reason or reason
        self.stop.set()
        return TeacherFatal(reason)

    def connected(self, ok) -> int:
        """Count a request that could not connect (ok=False), or end the streak -> requests in a row that could not."""
        with self.lock:
            self.connection_failures = 0 if ok else self.connection_failures + 1
            return self.connection_failures


def _http_once(cfg, path, body=None):
    """One request to the endpoint (`path` after /v1; POST `body` as JSON, or GET when it is None): the parsed JSON
    reply, or a TeacherError whose kind says whether a retry can help."""
    base = cfg.base_url.rstrip("/")
    url = base + ("" if base.endswith("/v1") else "/v1") + path
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(cfg.api_key_env, "").strip()  # a key read from a CRLF file, or pasted, ends in \r or \n
    if key:
        headers["Authorization"] = "Bearer " + key
    data = None if body is None else json.dumps(body).encode()
    try:
        request = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
        with urllib.request.urlopen(request, timeout=cfg.timeout) as response:
            raw = response.read()
    except ValueError as e:  # http.client's "Invalid header value b'Bearer <the key>'": never show the message
        if key and "header" in str(e).lower():
            raise TeacherFatal(f"${cfg.api_key_env} holds a character an HTTP header cannot carry (a line break "
                               "inside the key?); set it again") from None
        raise TeacherFatal(f"cannot send a request to {url!r} ({e}); check --base-url") from None
    except urllib.error.HTTPError as e:
        retry_after = e.headers.get("Retry-After", "")
        raise TeacherError(f"http_{e.code}", e.reason, float(retry_after) if retry_after.isdigit() else None) from None
    except TimeoutError:
        raise TeacherError("timeout") from None
    except urllib.error.URLError as e:
        raise TeacherError("timeout" if isinstance(e.reason, TimeoutError) else "connection", e.reason) from None
    except (OSError, http.client.HTTPException) as e:
        raise TeacherError("connection", type(e).__name__) from None
    try:
        return json.loads(raw)
    except ValueError:
        raise TeacherError("bad_response", repr(raw[:80])) from None


def _request_once(cfg, messages, extra=None):
    body = {"model": cfg.model, "messages": messages, "temperature": cfg.temperature, "top_p": cfg.top_p,
            "max_tokens": cfg.max_tokens, **(extra or {})}
    reply = _http_once(cfg, "/chat/completions", body)
    try:
        message = reply["choices"][0]["message"]
        content = message.get("content") or ""
        reasoning = message.get("reasoning_content") or message.get("reasoning") or ""
    except (KeyError, IndexError, TypeError, AttributeError):
        raise TeacherError("bad_response", repr(str(reply)[:80])) from None
    if reasoning:  # vLLM's reasoning parser and DeepSeek's API return the thinking separately
        content = f"<think>\n{reasoning.strip()}\n</think>\n\n{content.strip()}"
    elif "</think>" in content and "<think>" not in content:  # QwQ's template opens <think> in the prompt
        content = "<think>\n" + content
    if not content.strip():
        raise TeacherError("bad_response", "empty content")
    return content.strip()


def with_retries(cfg, attempt, stats=None, run=None):
    """attempt()'s result. Retries 429, 5xx, timeouts, connection errors and unusable bodies with exponential
    backoff; raises TeacherError at once on other 4xx; `stats` (a Counter) counts requests and failures by kind.
    Raises TeacherFatal, which should end the run, on 401/403, and once cfg.max_connection_failures requests in a
    row of `run` (the TeacherRun its concurrent requests share) could not connect: against a dead or refusing
    server, retrying each question would take hours for nothing."""
    stats = Counter() if stats is None else stats
    run = TeacherRun() if run is None else run
    for n in range(cfg.max_retries + 1):
        if run.stop.is_set():
            raise TeacherFatal(run.reason or "stopped")
        stats["requests"] += 1
        try:
            reply = attempt()
        except TeacherFatal as e:  # the key cannot be sent, the URL is malformed: no request of the run can go
            run.halt(str(e))
            raise
        except TeacherError as e:
            stats[e.kind] += 1
            failures = run.connected(e.kind != "connection")
            if e.kind in ("http_401", "http_403"):
                raise run.halt(f"the teacher at {cfg.base_url} refused the request ({e}): check the key in "
                               f"${cfg.api_key_env} (--api-key-env) and --model") from None
            if failures >= cfg.max_connection_failures:
                raise run.halt(f"{failures} requests in a row could not connect to {cfg.base_url} ({e}): is the "
                               "server up, at that address (--base-url)?") from None
            retryable = e.kind in ("http_429", "timeout", "connection", "bad_response") or e.kind.startswith("http_5")
            if not retryable or n == cfg.max_retries:
                raise
            delay = min(cfg.backoff_max, cfg.backoff_base * 2 ** n) * random.uniform(0.5, 1.5)
            run.stop.wait(min(cfg.backoff_max, max(delay, e.retry_after or 0)))
        else:
            run.connected(True)
            return reply


def chat_completion(cfg, messages, stats=None, run=None, extra=None) -> str:
    """The teacher's reply text, with with_retries' retries; `extra` adds fields to the request body (vLLM's
    top_k, allowed_token_ids)."""
    return with_retries(cfg, lambda: _request_once(cfg, messages, extra), stats, run)


# ----------------------------------------------------------------------------------------------------------------
# The student served by an inference server (vLLM): raw completions of the exact chat text (for Stage 2's sampling
# and chain-of-thought eval), so the prompt can never drift from what training saw.


@dataclasses.dataclass
class Server:
    """The student as an OpenAI-compatible server (vLLM) serves it: where, under which name, and the ModelConfig of
    the checkpoint it serves (for the context size)."""
    base_url: str
    name: str
    config: object = None
    concurrency: int = 64  # requests in flight; each asks for all of a prompt's samples (n)
    timeout: float = 1800.0  # per request, not streamed: a whole batch of long replies must fit in it


def served_models(base_url, timeout=5.0) -> list:
    """The model names an OpenAI-compatible server lists at /v1/models (one try: used to wait for a server)."""
    reply = _http_once(TeacherConfig(base_url=base_url, timeout=timeout), "/models")
    try:
        return [m["id"] for m in reply["data"]]
    except (KeyError, TypeError):
        raise TeacherError("bad_response", repr(str(reply)[:80])) from None


def _completion_once(cfg, body):
    reply = _http_once(cfg, "/completions", body)
    try:
        choices = sorted(reply["choices"], key=lambda c: c["index"])
        outputs = [(c["text"], c["finish_reason"]) for c in choices]
    except (KeyError, TypeError):
        raise TeacherError("bad_response", repr(str(reply)[:80])) from None
    if len(outputs) != body["n"] or not all(isinstance(text, str) for text, _ in outputs):
        raise TeacherError("bad_response", f"{len(outputs)} choices for n = {body['n']}")
    stops = [s for s in body["stop"] if s]
    # "stop" = the model ended the reply (a stop id or string, which vLLM leaves out of the text); "length" = cut
    # off at max_tokens. A server that keeps the stop string in the text gets it removed here.
    return [(next((text[:-len(s)] for s in stops if text.endswith(s)), text), reason == "stop")
            for text, reason in outputs]


def completions(server, prompts, n, max_tokens, temperature=0.0, top_p=1.0, top_k=0, stop_ids=STOP_IDS,
                stop=("<|im_end|>", "<|endoftext|>"), seed=0, stats=None):
    """n completions of each prompt text from `server`'s /v1/completions: [[(text, finished)] * n] in prompt
    order. Requests run server.concurrency at a time (the server batches them) with the teacher client's retries.
    `stop_token_ids` and `top_k` are vLLM's extensions (other servers ignore them; the `stop` strings cover
    that); prompt i is seeded with seed + i, so a rerun draws the same samples."""
    cfg = TeacherConfig(base_url=server.base_url, model=server.name, timeout=server.timeout)

    def one(i, prompt):
        body = {"model": server.name, "prompt": prompt, "n": n, "max_tokens": max_tokens, "temperature": temperature,
                "top_p": top_p, "seed": (seed + i) % 2**31, "stop": list(stop), "stop_token_ids": list(stop_ids),
                "skip_special_tokens": False, "add_special_tokens": False}
        if top_k > 0:
            body["top_k"] = top_k
        return with_retries(cfg, lambda: _completion_once(cfg, body), stats)

    with ThreadPoolExecutor(max(1, server.concurrency)) as pool:
        return list(pool.map(one, range(len(prompts)), prompts))


# ----------------------------------------------------------------------------------------------------------------
# distill: CMExam -> graded SFT data. Output: <out> holds kept records only (TRL-readable "messages" rows);
# <out minus .jsonl>.failed.jsonl holds questions every try got wrong, so a rerun does not ask again (delete it to
# retry them). A question whose tries hit a teacher error is written nowhere and is asked again on the next run.

def _distill_one(cfg, row, tries, hint_fallback, run=None):
    """Ask the teacher until a well-formed trajectory reaches the gold answer; (record or None, stats)."""
    stats, predicted = Counter(), []
    plan = [False] * tries + [True] * (tries if hint_fallback else 0)  # hinted tries only after plain ones fail
    for n, hint in enumerate(plan, 1):
        try:
            text = chat_completion(cfg, teacher_messages(row, row["answer"] if hint else None), stats, run)
        except TeacherError:
            return None, stats
        merged = merge_think(text)
        stats["think_merged"] += merged != text
        text = merged
        predicted.append(extract_answer(text))
        if predicted[-1] == row["answer"]:
            if prompt_reference(text, hint):
                stats["prompt_reference"] += 1
                continue
            if is_well_formed(text):
                # The user turn is the STUDENT prompt: the student must learn to reason without seeing templates.
                messages = student_messages(row) + [{"role": "assistant", "content": text}]
                return {"messages": messages, "id": row["id"], "answer": row["answer"], "predicted": predicted[-1],
                        "hint": hint, "tries": n, "kept": True, "teacher": cfg.model}, stats
            stats["malformed"] += 1
    return {"id": row["id"], "answer": row["answer"], "predicted": predicted, "hint": hint_fallback,
            "tries": len(plan), "kept": False, "teacher": cfg.model}, stats


def distill(cfg, data, out, tries=4, hint_fallback=False, limit=None) -> dict:
    """Distil the first `limit` questions of `data` into `out` (resuming if it exists); returns the summary."""
    from tqdm import tqdm

    rows = load_cmexam(data)[:limit]
    check_unique_ids(rows, data)
    out = Path(out)
    lock_output(out)
    failed_path = out.with_name(out.name.removesuffix(".jsonl") + ".failed.jsonl")
    done = done_ids(out) | done_ids(failed_path)
    pending = [row for row in rows if row["id"] not in done]
    summary = {"questions": len(rows), "already_done": len(rows) - len(pending), "kept": 0, "kept_with_hint": 0,
               "failed": 0, "errored": 0}
    stats, run, submit, written = Counter(), TeacherRun(), daemon_pool(cfg.concurrency), set()
    with open(out, "a", encoding="utf-8") as kept_file, open(failed_path, "a", encoding="utf-8") as failed_file:
        def write(future):
            nonlocal stats
            written.add(future)
            record, question_stats = future.result()
            stats += question_stats
            if record is None:
                summary["errored"] += 1
            else:
                append_jsonl(kept_file if record["kept"] else failed_file, record)
                summary["kept" if record["kept"] else "failed"] += 1
                summary["kept_with_hint"] += record["kept"] and record["hint"]

        futures = [submit(_distill_one, cfg, row, tries, hint_fallback, run) for row in pending]
        try:
            for future in tqdm(as_completed(futures), total=len(futures), desc="distill", dynamic_ncols=True):
                write(future)
        except BaseException:  # Ctrl-C or a fatal teacher error: stop the others, keep what has finished
            run.stop.set()
            for future in futures:  # cancel() fails on a finished future: keep its result
                if not future.cancel() and future.done() and future not in written and not future.exception():
                    write(future)
            raise
        finally:
            submit(None)
    summary.update(teacher_requests=stats.pop("requests", 0), malformed=stats.pop("malformed", 0),
                   dropped_prompt_reference=stats.pop("prompt_reference", 0),
                   think_merged=stats.pop("think_merged", 0), errors=dict(stats))
    print(json.dumps(summary))
    return summary


# ----------------------------------------------------------------------------------------------------------------
# Command line

def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    d = commands.add_parser("distill",
                            help="Stage 1 data: ask the teacher, keep trajectories that reach the gold answer")
    d.add_argument("--data", required=True, help="CMExam .csv, .json or .jsonl")
    d.add_argument("--out", required=True, help="SFT JSONL (appended to; a rerun skips questions already in it)")
    d.add_argument("--tries", type=positive_int, default=4, help="teacher attempts per question")
    d.add_argument("--hint-fallback", action="store_true",
                   help="after --tries wrong answers, try --tries more with the gold answer shown (recorded as hint)")
    d.add_argument("--limit", type=positive_int, default=None, help="only the first N questions of the file")
    for field in dataclasses.fields(TeacherConfig):
        d.add_argument("--" + field.name.replace("_", "-"), type=teacher_arg_type(field), default=field.default,
                       help=f"TeacherConfig.{field.name}")
    s = commands.add_parser("show", help="print the student, teacher and critique prompts for one question")
    s.add_argument("--data", required=True)
    s.add_argument("--index", type=nonnegative_int, default=0, help="0-based question index in the file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.command == "show":
        rows = load_cmexam(args.data)
        if args.index >= len(rows):
            raise UserError(f"--index {args.index}: {args.data} has {len(rows)} questions")
        row = rows[args.index]
        for name, messages in [("student", student_messages(row)), ("teacher", teacher_messages(row)),
                               ("critique", critique_messages(row, "<think>\n（模型的错误解答）\n</think>\n答案：？"))]:
            print(f"==== {name} ====\n{chat(messages)}")
        return
    cfg = TeacherConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TeacherConfig)})
    summary = distill(cfg, args.data, args.out, args.tries, args.hint_fallback, args.limit)
    if summary["errored"]:  # a pipeline must not carry on as if the data were complete
        raise UserError(f"{summary['errored']} questions got no usable reply from the teacher ({summary['errors']}); "
                        f"they are not in {args.out}: run the same command again to ask for them")


if __name__ == "__main__":
    run_main(main)
