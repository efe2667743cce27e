"""Every text format of MedCritical, and the Stage 1 teacher: chat template, CMExam, prompts, answers, distillation.

MedCritical (Su et al., arXiv 2509.23368) trains a small student in two stages. This file holds the text side of
both: the Qwen2.5-Instruct chat template and the SFT label mask; CMExam loading (Liu et al., NeurIPS 2023) and the
question as the student sees it; Stage 1's high-level template (the reasoning structure) and detailed template (a
worked long chain of thought) that guide the teacher; Stage 2's self-critique prompt; answer extraction, which
decides every accuracy number; and an OpenAI-compatible teacher client (standard library only) with the `distill`
command that turns CMExam questions into graded SFT data (only trajectories that reach the gold answer are kept).
Standard library only (tqdm for distill's progress bar); tokenizer arguments are `tokenizers.Tokenizer` objects.

    python templates.py distill --data train.csv --out sft.jsonl --base-url http://127.0.0.1:8000 --model QwQ-32B
    python templates.py show --data val.csv --index 0      # print every prompt built for one question
"""
import argparse
import csv
import dataclasses
import itertools
import json
import logging
import os
import random
import re
import time
import unicodedata
import http.client
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

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


def encode_chat(tokenizer, messages):
    """Token ids of chat(messages, add_generation_prompt=False) and a same-length list of bools, True exactly on
    the tokens of every assistant message's content and its closing <|im_end|> (the SFT/DPO labels: mask[i]
    says whether ids[i] is a target, predicted from ids[:i]; the caller shifts).

    `tokenizer` is a tokenizers.Tokenizer. The text is tokenized piece by piece (template / assistant output) so
    the mask is exact. The prompt part is tokenized alone, exactly as at inference, where the reply is generated
    after the tokens of chat(prompt); the result equals tokenizing the whole text in one go except when a reply
    begins with a line break (after optional spaces): Qwen's pre-tokenizer would merge it with the "\\n" after
    "assistant" into a token the model can never produce after the prompt."""
    ids, mask = [], []
    for trained, group in itertools.groupby(_chat_pieces(messages, False), key=lambda piece: piece[1]):
        piece_ids = tokenizer.encode("".join(text for text, _ in group), add_special_tokens=False).ids
        ids += piece_ids
        mask += [trained] * len(piece_ids)
    return ids, mask


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
    if path.suffix.lower() == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            columns, records, line = list(reader.fieldnames or []), [], 2
            for record in reader:  # a record spans several lines (the options), so name the one it starts on
                records.append((f"line {line}", record))
                line = reader.line_num + 1
        return records, columns
    if path.suffix.lower() == ".jsonl":
        lines = enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        records = [(f"line {i}", _json_or_none(text)) for i, text in lines if text.strip()]
    else:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of questions")
        records = [(f"item {i}", record) for i, record in enumerate(data)]
    columns = {k for _, record in records if isinstance(record, dict) for k in record}
    return records, sorted(columns)


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
        raise FileNotFoundError(f"CMExam file not found: {path}")
    records, columns = _read_records(path)
    missing = [official for ours, official in REQUIRED_COLUMNS.items()
               if ours not in columns and official not in columns]
    if missing:
        raise ValueError(f"{path}: missing required column(s) {missing}; it has {columns}")
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
# Answer extraction: the letters of the LAST explicit answer statement. The <think> block gets no special
# treatment: a final answer after </think> is later, so it wins; without one, the reasoning's last conclusion is
# the best reading there is. Matching runs on NFKC text, so full-width letters, colons and brackets become ASCII.

_PREFIX = "|".join([
    r"答案\**\s*(?:应该?是|应该?为|应选|就是|是|为|选)?\s*(?:选项)?",  # 答案：/答案是/正确答案为/最终答案应为
    r"正确(?:选项|的选项|的是)\s*(?:应该?是|应该?为|是|为)?",
    r"(?<!不)(?<!未)选择?(?!项)",  # 故选 / 本题选 / 应选, but not 选项A, 不选A
    r"(?i:answer)\**\s*(?:(?i:is)\b)?",  # Answer: / the answer is
    r"<answer>",
    r"\\boxed\{",
])
_ANSWER = re.compile(
    rf"(?:{_PREFIX})\**\s*:?\s*[(\[【\"“'*]*\s*"
    r"(?P<letters>[A-Ea-e]项?(?:(?:\s*[、和及与/&]\s*|\s+and\s+|\s*)[A-Ea-e]项?"  # AC, A、C, A项和C项, A and C
    r"|\s*,\s*[A-Ea-e](?!\s*(?:选?项|[是为错对正不均都也可的])))*)"  # "A,C" yet not "C,D项错误"
    r"(?![A-Za-z])(?!\s*[吗?])")  # not the start of an English word; not a question


def extract_answer(text) -> str:
    """Sorted unique letters of the last explicit answer statement in a model output, "" if there is none."""
    text = unicodedata.normalize("NFKC", text or "")
    answer = ""
    for m in _ANSWER.finditer(text):
        letters = re.sub(r"\s+and\s+", "、", m["letters"])
        if not letters.isupper():  # lower case only as separate letters, never a word ("is bad", "is a good")
            words = any(len(run) > 1 for run in re.findall(r"[A-Ea-e]+", letters))
            if words or re.match(r"\s+[A-Za-z]", text[m.end():]):
                continue
        answer = "".join(sorted(set(re.sub(r"[^A-E]", "", letters.upper()))))
    return answer


def is_well_formed(text) -> bool:
    """Our output format: one <think>...</think> block first, then an explicit answer after it."""
    text = text.strip()
    return (text.startswith("<think>") and text.count("<think>") == 1 and text.count("</think>") == 1
            and extract_answer(text.split("</think>")[1]) != "")


# ----------------------------------------------------------------------------------------------------------------
# Prompts: the student's question, Stage 1's templates and teacher prompt, Stage 2's critique prompt

def format_question(row) -> str:
    kind = "多项选择题（有两个或两个以上正确选项）" if len(row["answer"]) > 1 else "单项选择题（只有一个正确选项）"
    options = "\n".join(f"{letter}. {text}" for letter, text in sorted(row["options"].items()))
    return f"以下是一道{kind}。\n\n{row['question']}\n{options}"


OUTPUT_FORMAT = ("请先在<think>和</think>之间写出完整的推理过程，然后在</think>之后用一两句话总结依据，"
                 "最后一行写“答案：X”，X为正确选项的字母（多选题按字母顺序连写，如“答案：AC”）。")


def student_messages(row):
    """The question as the student sees it at training (SFT records) and at inference: no templates, no hint."""
    return [{"role": "user", "content": f"{format_question(row)}\n\n{OUTPUT_FORMAT}"}]


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


def _hint(hint_answer):  # the gold answer, shown only when a caller passes it explicitly (and records that)
    return (f"\n\n提示：本题的正确答案是{hint_answer}。请像独立解题一样写出完整推理，推理中不要提及这个提示。"
            if hint_answer else "")


def teacher_messages(row, hint_answer=None):
    """Stage 1 teacher prompt: the high-level template, the detailed template, then the question."""
    return [{"role": "user", "content": (
        f"你是一位经验丰富的临床医学专家，请为下面的医学考试题写出严谨、完整的推理过程。\n\n{HIGH_LEVEL_TEMPLATE}\n\n"
        f"下面是一个按此结构解答的示例：\n\n{DETAILED_TEMPLATE}\n\n现在请用同样的结构和格式解答这道题：\n\n"
        f"{format_question(row)}{_hint(hint_answer)}\n\n{OUTPUT_FORMAT}")}]


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


def extract_correction(text) -> str:
    """The corrected solution after the last CORRECTION_MARK of a critique output, "" if it has none."""
    parts = re.split(r"【\s*修正后的解答\s*】[:：]?", text)
    return parts[-1].strip() if len(parts) > 1 else ""


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


class TeacherError(Exception):
    def __init__(self, kind, detail="", retry_after=None):
        super().__init__(f"{kind} {detail}".strip())
        self.kind, self.retry_after = kind, retry_after


def _request_once(cfg, messages):
    base = cfg.base_url.rstrip("/")
    url = base + ("" if base.endswith("/v1") else "/v1") + "/chat/completions"
    body = {"model": cfg.model, "messages": messages, "temperature": cfg.temperature, "top_p": cfg.top_p,
            "max_tokens": cfg.max_tokens}
    headers = {"Content-Type": "application/json"}
    if os.environ.get(cfg.api_key_env):
        headers["Authorization"] = "Bearer " + os.environ[cfg.api_key_env]
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=cfg.timeout) as response:
            raw = response.read()
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
        message = json.loads(raw)["choices"][0]["message"]
        content = message.get("content") or ""
        reasoning = message.get("reasoning_content") or message.get("reasoning") or ""
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise TeacherError("bad_response", repr(raw[:80])) from None
    if reasoning:  # vLLM's reasoning parser and DeepSeek's API return the thinking separately
        content = f"<think>\n{reasoning.strip()}\n</think>\n\n{content.strip()}"
    elif "</think>" in content and "<think>" not in content:  # QwQ's template opens <think> in the prompt
        content = "<think>\n" + content
    if not content.strip():
        raise TeacherError("bad_response", "empty content")
    return content.strip()


def chat_completion(cfg, messages, stats=None) -> str:
    """The teacher's reply text. Retries 429, 5xx, timeouts, connection errors and unusable bodies with
    exponential backoff; raises TeacherError at once on other 4xx. `stats` (a Counter) counts requests and
    failures by kind."""
    stats = Counter() if stats is None else stats
    for attempt in range(cfg.max_retries + 1):
        stats["requests"] += 1
        try:
            return _request_once(cfg, messages)
        except TeacherError as e:
            stats[e.kind] += 1
            retryable = e.kind in ("http_429", "timeout", "connection", "bad_response") or e.kind.startswith("http_5")
            if not retryable or attempt == cfg.max_retries:
                raise
            delay = min(cfg.backoff_max, cfg.backoff_base * 2 ** attempt) * random.uniform(0.5, 1.5)
            time.sleep(min(cfg.backoff_max, max(delay, e.retry_after or 0)))


# ----------------------------------------------------------------------------------------------------------------
# distill: CMExam -> graded SFT data. Output: <out> holds kept records only (TRL-readable "messages" rows);
# <out minus .jsonl>.failed.jsonl holds questions every try got wrong, so a rerun does not ask again (delete it to
# retry them). A question whose tries hit a teacher error is written nowhere and is asked again on the next run.

def _distill_one(cfg, row, tries, hint_fallback):
    """Ask the teacher until a well-formed trajectory reaches the gold answer; (record or None, stats)."""
    stats, predicted = Counter(), []
    plan = [False] * tries + [True] * (tries if hint_fallback else 0)  # hinted tries only after plain ones fail
    for n, hint in enumerate(plan, 1):
        try:
            text = chat_completion(cfg, teacher_messages(row, row["answer"] if hint else None), stats)
        except TeacherError:
            return None, stats
        predicted.append(extract_answer(text))
        if predicted[-1] == row["answer"]:
            if is_well_formed(text):
                # The user turn is the STUDENT prompt: the student must learn to reason without seeing templates.
                messages = student_messages(row) + [{"role": "assistant", "content": text}]
                return {"messages": messages, "id": row["id"], "answer": row["answer"], "predicted": predicted[-1],
                        "hint": hint, "tries": n, "kept": True, "teacher": cfg.model}, stats
            stats["malformed"] += 1
    return {"id": row["id"], "answer": row["answer"], "predicted": predicted, "hint": hint_fallback,
            "tries": len(plan), "kept": False, "teacher": cfg.model}, stats


# Resumable outputs (distill here; eval_cmexam.py and selfplay.py too): every record is appended and synced as it
# is made, and a restarted run skips the ids already written.


def append_jsonl(f, record):
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())  # a killed run loses at most the records in flight, never a written one


def done_ids(path):
    """Ids already in a JSONL output; a last line cut off by a kill is truncated away first."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        log.warning("%s: dropping a partial last line left by an interrupted run", path)
        data = data[:data.rfind(b"\n") + 1]
        with open(path, "r+b") as f:
            f.truncate(len(data))
    return {json.loads(line)["id"] for line in data.decode("utf-8").splitlines() if line.strip()}


def distill(cfg, data, out, tries=4, hint_fallback=False, limit=None) -> dict:
    """Distil the first `limit` questions of `data` into `out` (resuming if it exists); returns the summary."""
    from tqdm import tqdm

    rows = load_cmexam(data)[:limit]
    if len({row["id"] for row in rows}) != len(rows):
        raise ValueError(f"{data}: question ids are not unique, so a run could not resume")
    out = Path(out)
    failed_path = out.with_name(out.name.removesuffix(".jsonl") + ".failed.jsonl")
    done = done_ids(out) | done_ids(failed_path)
    pending = [row for row in rows if row["id"] not in done]
    summary = {"questions": len(rows), "already_done": len(rows) - len(pending), "kept": 0, "kept_with_hint": 0,
               "failed": 0, "errored": 0}
    stats = Counter()
    with open(out, "a", encoding="utf-8") as kept_file, open(failed_path, "a", encoding="utf-8") as failed_file, \
            ThreadPoolExecutor(cfg.concurrency) as pool:
        futures = [pool.submit(_distill_one, cfg, row, tries, hint_fallback) for row in pending]
        try:
            for future in tqdm(as_completed(futures), total=len(futures), desc="distill", dynamic_ncols=True):
                record, question_stats = future.result()
                stats += question_stats
                if record is None:
                    summary["errored"] += 1
                else:
                    append_jsonl(kept_file if record["kept"] else failed_file, record)
                    summary["kept" if record["kept"] else "failed"] += 1
                    summary["kept_with_hint"] += record["kept"] and record["hint"]
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    summary.update(teacher_requests=stats.pop("requests", 0), malformed=stats.pop("malformed", 0), errors=dict(stats))
    print(json.dumps(summary))
    return summary


# ----------------------------------------------------------------------------------------------------------------
# Command line

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    d = commands.add_parser("distill", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                            help="Stage 1 data: ask the teacher, keep trajectories that reach the gold answer")
    d.add_argument("--data", required=True, help="CMExam .csv, .json or .jsonl")
    d.add_argument("--out", required=True, help="SFT JSONL (appended to; a rerun skips questions already in it)")
    d.add_argument("--tries", type=int, default=4, help="teacher attempts per question")
    d.add_argument("--hint-fallback", action="store_true",
                   help="after --tries wrong answers, try --tries more with the gold answer shown (recorded as hint)")
    d.add_argument("--limit", type=int, default=None, help="only the first N questions of the file")
    for field in dataclasses.fields(TeacherConfig):
        d.add_argument("--" + field.name.replace("_", "-"), type=type(field.default), default=field.default,
                       help=f"TeacherConfig.{field.name}")
    s = commands.add_parser("show", help="print the student, teacher and critique prompts for one question")
    s.add_argument("--data", required=True)
    s.add_argument("--index", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.command == "show":
        row = load_cmexam(args.data)[args.index]
        for name, messages in [("student", student_messages(row)), ("teacher", teacher_messages(row)),
                               ("critique", critique_messages(row, "<think>\n（模型的错误解答）\n</think>\n答案：？"))]:
            print(f"==== {name} ====\n{chat(messages)}")
        return
    cfg = TeacherConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TeacherConfig)})
    distill(cfg, args.data, args.out, args.tries, args.hint_fallback, args.limit)


if __name__ == "__main__":
    main()
