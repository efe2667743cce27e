"""A rule-based teacher for the miniature exam, standing in for QwQ-32B, served over the OpenAI-compatible protocol.

MedCritical's Stage 1 asks a large teacher for template-guided long chains of thought (templates.teacher_messages);
its costly baseline asks the teacher to correct the student's wrong answers (templates.critique_messages). This
teacher knows the knowledge base (kb.json from exam.py), as a real teacher knows medicine, and reads everything else
from the prompt: it never sees the answer key. It writes the templates' six steps in a compact, mechanical form:

    <think>
    审题：单选，问诊断，须逐项比较。
    提取关键信息：热、咳、喘。
    回忆相关知识：肺炎、心衰、肺癌、脑炎、胃炎的表现，逐项回忆如下。
    逐项分析各选项：
    A 肺炎：热、咳、痰、喘；热有 咳有 喘有，对     <- the option's knowledge entry, recalled (it is not in the
    B 心衰：喘、肿、悸、乏；热无 咳无 喘有，错        question), then each finding checked against it, then the mark
    自我检查与纠正：对者A，共1项，与单选相符。
    得出结论：A。
    </think>
    热、咳、喘皆见于肺炎。
    答案：A

The answer is exactly the options marked 对, so a student trained on this can have answers that follow from its
steps; `consistency` measures whether they do. Corrections keep every right line and fix the wrong ones.

    python miniature/teacher.py --kb runs/mini/data/kb.json --port 8000      # then templates.py distill --model ...
    model "miniature-template" (default) writes the template; "miniature-plain" a one-line rationale and the answer.
"""
import argparse
import json
import re
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: templates.py
from templates import CORRECTION_MARK, FIRST_WRONG_LINE, extract_answer  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------
# Reading the question back out of a prompt built by templates.format_question

_QUESTION = re.compile(r"以下是一道(单项|多项)选择题[^\n]*\n\n(?P<stem>[^\n]+)\n(?P<options>(?:[A-E]\. [^\n]+(?:\n|$))+)")
_STEMS = [("诊断", re.compile(r"患者见(.+)。最可能的诊断是")), ("诊断-治疗", re.compile(r"患者见(.+)。应首选的治疗是")),
          ("否定", re.compile(r"下列哪项不是(.+)的表现")), ("多选", re.compile(r"(.+)的表现有")),
          ("科室", re.compile(r"下列疾病属(.+科)的是")), ("何科", re.compile(r"(.+)属于哪一科"))]
_KNOWN = re.compile(r"已知：((?:[^：；。]+：[^；。]+)(?:；[^：；。]+：[^；。]+)*)。(.+)")
SECTIONS = ["审题", "提取关键信息", "回忆相关知识", "逐项分析各选项", "自我检查与纠正", "得出结论"]
ASK = {"诊断": "单选，问诊断，须逐项比较。", "诊断-治疗": "单选，先由表现诊断，再选治疗。",
       "否定": "单选，问哪项不是其表现。", "多选": "多选，问哪些是其表现。",
       "科室": "单选，问哪种疾病属该科。", "何科": "单选，问其所属科室。"}


def parse_question(text):
    """{kind, multi, options {letter: text}, given [findings] or subject (a department for 科室)} of the last exam
    question in `text` (the teacher prompt shows the template's worked example first), or None if there is none."""
    for m in reversed(list(_QUESTION.finditer(text))):
        stem, known = m["stem"].strip(), {}
        given = _KNOWN.fullmatch(stem)  # a reading question (exam.reading_question) states its entries first
        if given:
            known = dict(entry.split("：", 1) for entry in given[1].split("；"))
            known, stem = {n: "".join(f.split("、")) for n, f in known.items()}, given[2]
        options = dict(re.findall(r"([A-E])\. ([^\n]+)", m["options"]))
        for kind, pattern in _STEMS:
            s = pattern.fullmatch(stem)
            if s:
                q = {"kind": kind, "multi": m[1] == "多项", "options": options, **({"known": known} if known else {})}
                q.update({"given": s[1].split("、")} if kind.startswith("诊断") else {"subject": s[1]})
                return q
    return None


# ----------------------------------------------------------------------------------------------------------------
# Solving. `beliefs` is what the solver "remembers": the knowledge base, or a corrupted copy of it (the student's
# kind of error); `flips` turns single check marks the wrong way. Every later step follows mechanically.

def beliefs_for(kb, q):
    """What the solver knows for q: the knowledge base, plus the entries a reading question states."""
    if not q.get("known"):
        return kb
    return {**kb, "diseases": {**kb["diseases"], **{n: {"findings": f} for n, f in q["known"].items()}}}


def solve(kb, q, beliefs=None, flips=(), answer=None):
    """The trajectory as [(section, [lines])], the summary line, and the answer (letters marked 对, or `answer`)."""
    beliefs = beliefs or beliefs_for(kb, q)
    recall = lambda name: beliefs["diseases"][name]["findings"] if name in beliefs["diseases"] else ""  # noqa: E731
    flipped = lambda letter, item, value: value != ((letter, item) in flips)  # noqa: E731
    kind, options, knowledge, analysis = q["kind"], q["options"], [], []
    if kind == "诊断":
        # Each option's entry is recalled on its own line, right before the checks against it: every check then
        # looks a few tokens back (a tiny student failed to look the entry up lines above).
        keys = "、".join(q["given"])
        knowledge = [f"{'、'.join(options.values())}的表现，逐项回忆如下。"]
        for letter, name in options.items():
            marks = [(f, flipped(letter, f, f in recall(name))) for f in q["given"]]
            checks = " ".join(f + ("有" if m else "无") for f, m in marks)
            analysis.append((letter, f"{name}：{'、'.join(recall(name))}；{checks}", all(m for _, m in marks)))
    elif kind == "诊断-治疗":
        keys = "、".join(q["given"])
        lists = [beliefs["index"].get(f, []) for f in q["given"]]
        common = [n for n in lists[0] if all(n in other for other in lists[1:])]
        knowledge = [f"{f}见于：{'、'.join(names)}" for f, names in zip(q["given"], lists)]
        knowledge.append(f"皆见者：{'、'.join(common) or '无'}")
        dx = common[0] if len(common) == 1 else ""
        treatment = beliefs["diseases"][dx]["treatment"] if dx else ""
        if dx:
            knowledge.append(f"{dx}：{'、'.join(recall(dx))}；治以{treatment}")
        for letter, text in options.items():  # the treatment restated on each line: a local comparison
            ok = flipped(letter, None, bool(dx) and text == treatment)
            analysis.append((letter, f"{text}：{dx or '该病'}治以{treatment or '不明'}", ok))
    elif kind in ("科室", "何科"):
        # The department is read off the name's organ (its first character), the same for a T or a G name: no
        # finding of any disease is recited, and each line restates the department it compares.
        department = lambda name: beliefs["diseases"][name]["department"]  # noqa: E731
        if kind == "科室":
            keys = q["subject"]
            knowledge = [f"{'、'.join(options.values())}所属科室，由病名的脏器判断。"]
            for letter, name in options.items():
                ok = flipped(letter, None, department(name) == q["subject"])
                analysis.append((letter, f"{name}：{name[0]}属{department(name)}", ok))
        else:
            subject = q["subject"]
            keys, knowledge = f"{subject}；问其科室", [f"{subject[0]}属{department(subject)}"]
            for letter, text in options.items():
                ok = flipped(letter, None, text == department(subject))
                analysis.append((letter, f"{text}：{subject[0]}属{department(subject)}", ok))
    else:
        subject = q["subject"]
        keys = f"{subject}；{'不是' if kind == '否定' else '是'}其表现者"
        knowledge = [f"{subject}：{'、'.join(recall(subject))}"]
        for letter, f in options.items():  # the entry restated on each line, so the check looks a few tokens back
            has = flipped(letter, None, f in recall(subject))
            analysis.append((letter, f"{f}：{'、'.join(recall(subject))}；{'有' if has else '无'}",
                             has != (kind == "否定")))
    marked = "".join(letter for letter, _, ok in analysis if ok)
    answer = marked if answer is None else answer
    fits = len(marked) >= 2 if q["multi"] else len(marked) == 1
    check = (f"对者{'、'.join(marked) or '无'}，共{len(marked)}项，与{'多选' if q['multi'] else '单选'}"
             f"{'相符' if fits else '不符'}。")
    steps = [("审题", [ASK[kind]]), ("提取关键信息", [keys + "。"]), ("回忆相关知识", knowledge),
             ("逐项分析各选项", [f"{letter} {body}，{'对' if ok else '错'}" for letter, body, ok in analysis]),
             ("自我检查与纠正", [check]), ("得出结论", [f"{answer or '无'}。"])]
    return steps, summary(q, answer, beliefs), answer


def summary(q, answer, kb):
    """The one-line rationale after </think> (and the whole of the plain style's reasoning)."""
    chosen = [q["options"][letter] for letter in answer if letter in q["options"]]
    if not chosen:
        return "无符合的选项。"
    if q["kind"] == "诊断":
        return f"{'、'.join(q['given'])}皆见于{'、'.join(chosen)}。"
    if q["kind"] == "诊断-治疗":
        lists = [kb["index"].get(f, []) for f in q["given"]]
        common = [n for n in lists[0] if all(n in other for other in lists[1:])]
        return f"{'、'.join(q['given'])}皆见者为{'、'.join(common) or '无'}，治以{'、'.join(chosen)}。"
    if q["kind"] == "科室":
        return f"{'、'.join(chosen)}属{q['subject']}。"
    if q["kind"] == "何科":
        return f"{q['subject']}属{'、'.join(chosen)}。"
    return f"{q['subject']}{'无' if q['kind'] == '否定' else '有'}{'、'.join(chosen)}。"


def render(steps, summary_line, answer) -> str:
    """The template style: the six steps in <think>, then the rationale and the answer line."""
    body = []
    for section, lines in steps:
        body += [f"{section}：{lines[0]}"] if len(lines) == 1 and section not in ("回忆相关知识", "逐项分析各选项") \
            else [f"{section}："] + lines
    return "<think>\n" + "\n".join(body) + f"\n</think>\n{summary_line}\n答案：{answer or '无'}"


def answer_text(kb, q, style="template") -> str:
    steps, line, answer = solve(kb, q)
    if style == "plain":  # no template: a one-line rationale, the kind of answer CMExam's explanations give
        return f"<think>\n{line}\n</think>\n答案：{answer}"
    return render(steps, line, answer)


# ----------------------------------------------------------------------------------------------------------------
# Consistency: does a trajectory's answer follow from its own step marks? Computed from the text alone.

_OPTION_LINE = re.compile(r"^([A-E]) ([^：\n]+)：([^\n]*)，(对|错)$", re.M)


def sections(text) -> dict:
    """{section: [lines]} of a trajectory in the template format (missing sections absent)."""
    think = text.split("</think>")[0]
    found, current = {}, None
    for line in think.splitlines():
        head = next((s for s in SECTIONS if line.startswith(s + "：")), None)
        if head:
            current = head
            rest = line[len(head) + 1:].strip()
            found[current] = [rest] if rest else []
        elif current and line.strip():
            found[current].append(line.strip())
    return found


def implied_answer(text):
    """The letters the trajectory marks 对 in its option analysis; None if it has no parseable option line."""
    lines = sections(text).get("逐项分析各选项", [])
    marks = [_OPTION_LINE.match(line) for line in lines]
    marks = [m for m in marks if m]
    return None if not marks else "".join(sorted(m[1] for m in marks if m[4] == "对"))


def follows_marks(text) -> bool:
    """The final answer equals the set of options the trajectory itself marked 对."""
    implied = implied_answer(text)
    return implied is not None and implied == extract_answer(text)


def consistency(texts) -> float:
    """Share of trajectories whose final answer follows from their own step marks."""
    texts = list(texts)
    return sum(map(follows_marks, texts)) / max(1, len(texts))


def steps_right(text, reference) -> bool:
    """Every step is right: the <think> block equals the reference's line for line. The summary after </think> is
    not a step, and a right reply may word it otherwise."""
    return text.split("</think>")[0] == reference.split("</think>")[0]


def step_accuracy(text, reference) -> float:
    """Share of the reference trajectory's step lines (knowledge and option analysis) that `text` has verbatim."""
    ours, ref = sections(text), sections(reference)
    wanted = [(s, line) for s in ("回忆相关知识", "逐项分析各选项") for line in ref.get(s, [])]
    return sum(line in ours.get(s, []) for s, line in wanted) / max(1, len(wanted))


# ----------------------------------------------------------------------------------------------------------------
# Errors and corrections. A corrupted trajectory is what a student gets wrong: a misremembered knowledge entry, a
# misread finding or a wrong check mark, with every later step following it; or an answer that ignores the marks.

def corrupt(kb, q, rng, tries=100):
    """A wrong trajectory for q (its answer differs from the right one) and the kinds of error in it."""
    _, _, right = solve(kb, q)
    kinds_here = ["knowledge", "knowledge", "check", "conclusion"] + (["misread"] if "given" in q else [])
    for _ in range(tries):
        beliefs, flips, qq, kinds, answer = json.loads(json.dumps(beliefs_for(kb, q))), set(), dict(q), [], None
        for _ in range(1 if rng.random() < 0.7 else 2):
            kind = rng.choice(kinds_here)
            kinds.append(kind)
            if kind == "knowledge":
                _misremember(beliefs, q, rng)
            elif kind == "check":
                letter = rng.choice(sorted(q["options"]))
                flips.add((letter, rng.choice(q["given"]) if q["kind"] == "诊断" else None))
            elif kind == "misread":
                given = list(qq["given"])
                given[rng.randrange(len(given))] = rng.choice([f for f in kb["index"] if f not in given])
                qq["given"] = given
            else:  # the conclusion ignores the marks: the prototype's most common failure
                answer = rng.choice([letter for letter in sorted(q["options"]) if letter != right])
        steps, line, answer = solve(kb, qq, beliefs, flips, answer)
        if answer != right:
            return render(steps, line, answer), kinds
    raise RuntimeError("no corruption changed the answer")


def _misremember(beliefs, q, rng):
    """Swap one finding of one recalled entry (or one name of one index line, or one disease's department)."""
    if q["kind"] == "诊断-治疗":
        f = rng.choice(q["given"])
        names = beliefs["index"][f]
        others = [n for n in beliefs["diseases"] if n not in names]
        names[rng.randrange(len(names))] = rng.choice(others)
        return
    name = rng.choice(sorted(q["options"].values())) if q["kind"] in ("诊断", "科室") else q["subject"]
    d = beliefs["diseases"][name]
    if q["kind"] in ("科室", "何科"):
        d["department"] = rng.choice(sorted({e["department"] for e in beliefs["diseases"].values()
                                             if "department" in e} - {d["department"]}))
        return
    pool = sorted({f for e in beliefs["diseases"].values() for f in e["findings"]} - set(d["findings"]))
    i = rng.randrange(len(d["findings"]))
    d["findings"] = d["findings"][:i] + rng.choice(pool) + d["findings"][i + 1:]


def critique_text(kb, q, wrong, max_problems=4) -> str:
    """The critique prompt's expected output: the wrong steps named with their right form, then CORRECTION_MARK and
    the full corrected trajectory (the wrong one with exactly those lines fixed, as the format is canonical)."""
    right = answer_text(kb, q)
    theirs, ours = sections(wrong), sections(right)
    problems = [f"{section}有误，应为：{line}" for section in ("提取关键信息", "回忆相关知识", "逐项分析各选项")
                for line in ours[section] if line not in theirs.get(section, [])]
    if len(problems) > max_problems:  # wrong nearly everywhere: name the first errors, the solution shows the rest
        problems = problems[:max_problems] + ["其余错误见修正后的解答。"]
    if not theirs:
        problems = ["原解答未按步骤推理。"]
    elif not problems:
        problems = ["各步判断无误，但结论与之不一致。"]
    problems.append(f"故答案应为{extract_answer(right)}。")
    return "逐步检查原解答：\n" + "\n".join(problems) + f"\n{CORRECTION_MARK}\n{right}"


def first_wrong_line(kb, q, wrong):
    """1-based number of the first line of `wrong` that differs from the teacher's own trajectory, None if none
    does. The format is canonical (a right step is the very same line), so this is the first wrong step."""
    right, theirs = answer_text(kb, q).split("\n"), wrong.split("\n")
    return next((k + 1 for k in range(max(len(right), len(theirs)))
                 if k >= len(right) or k >= len(theirs) or right[k] != theirs[k]), None)


def step_critique_text(kb, q, wrong) -> str:
    """The step critique prompt's expected output (templates.step_critique_messages): the lines checked in order
    from the first step line (line 2, after <think>), each right one passed with "无误", the first wrong one given its
    right form, then the line number last. It states no answer: it locates, and the student rewrites from there."""
    n = first_wrong_line(kb, q, wrong)
    if n is None:
        return f"逐行检查：未发现错误。\n{FIRST_WRONG_LINE}：无"
    right = answer_text(kb, q).split("\n")
    fix = right[n - 1] if n - 1 < len(right) else "（此行多余）"
    checks = [f"{k} 无误" for k in range(2, n)] + [f"{n} 有误，应为：{fix}"]
    return "逐行检查：\n" + "\n".join(checks) + f"\n{FIRST_WRONG_LINE}：{n}"


_NUMBERED = re.compile(r"^\d+\| ?", re.M)


# ----------------------------------------------------------------------------------------------------------------
# The server: POST /v1/chat/completions on 127.0.0.1. The reply depends on the prompt: a critique prompt (it holds
# 【原解答】) gets a correction; any prompt holding a question gets an answer in the style the `model` names.

def reply(kb, body) -> str:
    messages = body.get("messages") or []
    prompt = next((m.get("content") or "" for m in reversed(messages) if m.get("role") == "user"), "")
    q = parse_question(prompt)
    if q is None:
        return "<think>\n题目无法识别。\n</think>\n无法作答。"
    if "【原解答】" in prompt and FIRST_WRONG_LINE in prompt:  # the step critique: lines numbered "N| "
        wrong = prompt.split("【原解答】\n", 1)[1].split("\n【原解答结束】", 1)[0]
        return step_critique_text(kb, q, _NUMBERED.sub("", wrong))
    if "【原解答】" in prompt:
        wrong = prompt.split("【原解答】", 1)[1].split("【原解答结束】", 1)[0]
        return critique_text(kb, q, wrong.strip())
    return answer_text(kb, q, "plain" if "plain" in str(body.get("model", "")) else "template")


def serve(kb, port=0):
    """Start the teacher in a daemon thread; returns (server, base_url, stats Counter). Stop with server.shutdown()."""
    stats, lock = Counter(), threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
                return self._send(404, {"error": {"message": f"no route {self.path}"}})
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                text = reply(kb, body)
            except (ValueError, TypeError, AttributeError) as e:
                return self._send(400, {"error": {"message": f"bad request: {e}"}})
            with lock:
                stats["requests"] += 1
                stats["critiques" if CORRECTION_MARK in text or FIRST_WRONG_LINE in text else "answers"] += 1
            self._send(200, {"id": f"mini-{stats['requests']}", "object": "chat.completion",
                             "model": body.get("model", "miniature-template"),
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": text}}]})

        def _send(self, status, payload):
            data = json.dumps(payload, ensure_ascii=False).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 64  # distill keeps 8+ requests in flight; the default backlog of 5 drops some

    server = Server(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}", stats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kb", required=True, help="kb.json written by miniature/exam.py")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    server, url, _ = serve(json.loads(Path(args.kb).read_text(encoding="utf-8")), args.port)
    print(f"teacher at {url}/v1/chat/completions (Ctrl-C stops)")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()


if __name__ == "__main__":
    main()
