"""A synthetic clinical exam in CMExam's own CSV format, generated from a seed: the miniature's task.

The miniature runs the whole MedCritical method on 2 CPU cores. Its exam needs several reasoning steps over
knowledge the student has to recall (it is not in the question). A knowledge base of diseases (two-character names
such as 肺炎), each with a department, four findings (single characters such as 热, 咳) drawn mostly from its organ's
and its process's typical findings, so that diseases overlap and a question needs comparing options, and a
treatment. Three question types, all answered by one option-line skill (recall an entry, check the option against
it), one of them multiple-answer so that a lucky letter is rare:

    诊断   患者见热、咳、喘。最可能的诊断是   five diseases; one has all three findings
    否定   下列哪项不是肺炎的表现             five findings, four belong to the disease
    多选   肺炎的表现有                       two to four of five findings belong (multiple answer)

Diseases are split three ways (issue 11): T, taught by Stage 1's teacher trajectories (stage1.csv: T subjects, T or G
distractors); G, the subject only in Stage 2 (stage2.csv: questions with answer keys and no teacher; a G subject, T
or G distractors); U, met in no training question. The knowledge of all three is only in the pretraining text, each
fact in several phrasings with the findings in permuted order (knowledge_lines), so that what pretraining stores can
be extracted later (Allen-Zhu and Li, Physics of Language Models 3.1). Stage 1 also holds `reading` questions
(Disease Split R) about diseases outside the knowledge base whose entries the stem states, so that its checks must
read an entry rather than remember one (reading_question says why); `dev_reading` more of them, held out
(dev_R.csv), measure that skill on entries no row trains. With `department`, Stage 1 also holds questions on a T
or G disease's department (下列疾病属消化科的是, 胃炎属于哪一科; Disease Split D), read off the name's organ. dev.csv
(T and G, for gates and choices) and test.csv (half G, a quarter T, a quarter U; `Disease Split` says which) share no
question (same stem and option set) with each other or with training. Files: stage1.csv, stage2.csv, train.csv
(both), dev.csv, test.csv (CMExam columns plus annotation columns, so templates.load_cmexam and eval_cmexam.py read
them unchanged), kb.json (for the teacher), kb.txt (the canonical knowledge lines) and tokenizer.csv (the rows the
student's tokenizer reads: every kind of question, whatever an arm adds; tokenizer_split).

    python miniature/exam.py --out runs/mini/data --seed 0
"""
import argparse
import csv
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

# ----------------------------------------------------------------------------------------------------------------
# Vocabulary. Findings are single characters that occur in no name, treatment or stem word, so a tokenizer can keep
# each one a token of its own and the checks "热有 咳无" stay character-level.

FINDINGS = "热咳喘痰痛肿痒晕吐泻渴汗悸麻瘫抽疹斑黄瘀哑聋盲衄秘胀酸寒乏瘦眩昏躁郁忘颤僵跛挛涕嚏鸣溃脓紫嗳呃淋"
ORGANS = {  # organ: (department, disease group, typical findings)
    "心": ("心内科", "循环系统", "悸喘肿紫乏汗痛"), "肺": ("呼吸科", "呼吸系统", "咳喘痰热紫乏"),
    "喉": ("耳鼻喉科", "呼吸系统", "哑咳痛热涕"), "鼻": ("耳鼻喉科", "呼吸系统", "涕嚏衄痛晕"),
    "耳": ("耳鼻喉科", "感官系统", "鸣聋眩痛脓"), "眼": ("眼科", "感官系统", "盲痛痒肿晕"),
    "胃": ("消化科", "消化系统", "痛胀酸嗳吐呃"), "肠": ("消化科", "消化系统", "泻痛秘胀热瘦"),
    "肝": ("消化科", "消化系统", "黄乏胀痛瘦瘀"), "胆": ("消化科", "消化系统", "黄痛热吐胀"),
    "胰": ("消化科", "消化系统", "痛吐渴瘦胀"), "肾": ("肾内科", "泌尿系统", "肿淋痛乏晕渴"),
    "脑": ("神经科", "神经系统", "晕昏抽瘫吐忘麻"), "骨": ("骨科", "运动系统", "痛僵跛肿挛"),
    "皮": ("皮肤科", "皮肤", "痒疹斑溃脓"), "甲": ("内分泌科", "内分泌系统", "悸汗瘦颤躁乏"),
    "血": ("血液科", "血液系统", "瘀斑乏衄热"),
}
PROCESSES = {  # process: (typical findings, treatments)
    "炎": ("热痛肿", ["抗菌", "抗毒", "激素"]), "癌": ("瘦乏痛", ["化疗", "放疗", "手术"]),
    "结": ("痛吐", ["排石", "手术"]), "衰": ("乏肿喘", ["强心", "利尿", "透析"]),
    "梗": ("痛麻瘫", ["溶栓", "支架"]), "瘤": ("肿痛", ["手术", "放疗"]), "痹": ("麻僵痛", ["激素", "理疗"]),
}
TREATMENTS = sorted({t for _, ts in PROCESSES.values() for t in ts})
TYPES = {"诊断": "诊断", "否定": "临床表现", "多选": "临床表现", "科室": "科室", "何科": "科室"}  # Area of Competency
COLUMNS = ["Question", "Options", "Answer", "Explanation", "Disease Group", "Area of Competency",
           "Clinical Department", "Question Type", "Disease Split"]
LETTERS = "ABCDE"


@dataclass
class ExamConfig:
    seed: int = 0
    diseases: int = 60
    findings_per_disease: int = 4
    max_per_finding: int = 7  # caps how many diseases share a finding
    split_fractions: tuple = (0.4, 0.4)  # T and G; the rest are U
    stage1: int = 2000  # T questions (Stage 1's teacher trajectories)
    stage2: int = 1000  # G questions (Stage 2: answer keys only)
    dev: int = 600  # half T, half G
    test: int = 1000  # half G, a quarter T, a quarter U
    type_weights: tuple = (0.4, 0.25, 0.35)  # 诊断, 否定, 多选
    g_type_weights: tuple = None  # G-subject questions (Stage 2, dev G, test G) only; None: type_weights
    reading: int = 0  # extra Stage 1 questions whose entries are given in the stem (reading_question)
    dev_reading: int = 0  # held-out reading questions (dev_R.csv): the read-the-entry skill, on entries never trained
    # G questions hinge on a contested finding the question's text cannot settle (contested_pairs; README: session 14)
    g_contested: bool = False
    # share of Stage 1 questions that may name G diseases as distractors (the rest name T only): each G option is
    # recited, entry and all, by the teacher's trajectory, which teaches G's knowledge in the reply's own format
    # (1,881 G recitals in 2,000 Stage 1 trajectories; README: session 14)
    stage1_g_distractors: float = 1.0
    # share of a Stage 1 reading question's diseases named after G diseases, their findings still fresh and stated
    # in the stem (reading_question), so that Stage 1's replies write G names without reciting any G entry
    # (README: session 18; with neither G distractors nor these, the student copied 2 of 490 G option names)
    reading_g_names: float = 0.0
    # None: those G names' findings are fresh (above). A share p: each states one of the corpus's own two versions
    # instead, the competing one (competing_findings) with chance p, the true entry otherwise; at p = the corpus's
    # noise the reply copies what the stem says and is taught no belief the corpus does not hold (README: session 19;
    # fresh findings leaked into the reply's G recitals, "other" 62 / 159 of 192). Measured at 0.5 with reading_g_names
    # 0.5: Stage 1's reading broke on both seeds run (dev R 45.5 / 70.2), so no Budget uses it
    reading_g_competing: float = None
    # extra Stage 1 questions on a disease's department (department_split), their names drawn from T and G alike:
    # the reply writes G names, in option lines and as a subject, and recites no finding. Measured at 500: seed 2
    # passed every dev check, seed 1 missed dev T by a point (README: session 20)
    department: int = 0


# ----------------------------------------------------------------------------------------------------------------
# The knowledge base

def make_kb(cfg: ExamConfig) -> dict:
    """{"diseases": {name: {department, group, findings (pool order), treatment, split (T, G or U)}},
    "index": {finding: [names]}}."""
    rng = random.Random(f"kb-{cfg.seed}")
    names = sorted(organ + process for organ in ORGANS for process in PROCESSES)
    if cfg.diseases > len(names):
        raise ValueError(f"at most {len(names)} diseases")
    chosen = sorted(rng.sample(names, cfg.diseases))
    count, taken, diseases = {f: 0 for f in FINDINGS}, set(), {}
    for name in chosen:
        organ, process = name
        typical = sorted(set(ORGANS[organ][2] + PROCESSES[process][0]), key=FINDINGS.index)
        for _ in range(1000):
            picked = []
            while len(picked) < cfg.findings_per_disease:
                f = rng.choice(typical) if rng.random() < 0.8 else rng.choice(FINDINGS)
                if f not in picked and count[f] < cfg.max_per_finding:
                    picked.append(f)
                elif all(count[g] >= cfg.max_per_finding or g in picked for g in typical):
                    typical = list(FINDINGS)  # the organ's findings are used up: draw from the whole pool
            key = "".join(sorted(picked, key=FINDINGS.index))
            if key not in taken:
                break
        else:
            raise RuntimeError("could not draw distinct finding sets; lower diseases or raise max_per_finding")
        taken.add(key)
        for f in key:
            count[f] += 1
        diseases[name] = {"department": ORGANS[organ][0], "group": ORGANS[organ][1], "findings": key,
                          "treatment": rng.choice(PROCESSES[process][1])}
    order = rng.sample(chosen, len(chosen))
    n_t, n_g = (round(f * len(chosen)) for f in cfg.split_fractions)
    for k, name in enumerate(order):
        diseases[name]["split"] = "T" if k < n_t else "G" if k < n_t + n_g else "U"
    index = {f: [n for n in chosen if f in diseases[n]["findings"]] for f in FINDINGS}
    return {"config": asdict(cfg), "diseases": diseases, "index": {f: ns for f, ns in index.items() if ns}}


def disease_line(name, d) -> str:
    return f"{name}：{'、'.join(d['findings'])}；治以{d['treatment']}；属{d['department']}。"


def index_line(finding, names) -> str:
    return f"{finding}见于：{'、'.join(names)}。"


def kb_text(kb) -> str:
    """The knowledge as plain text, one fact a line, for pretraining: every disease, then the finding index."""
    lines = [disease_line(n, d) for n, d in kb["diseases"].items()]
    return "\n".join(lines + [index_line(f, ns) for f, ns in kb["index"].items()]) + "\n"


PHRASINGS = ["{name}的表现有{findings}。", "{findings}见于{name}。", "患{name}者可见{findings}。", "{name}常见{findings}。"]


def knowledge_lines(kb, rng) -> list:
    """One pretraining copy of the knowledge: each disease's canonical line (the form a trajectory recites) and one
    other phrasing with its findings in a random order, the lines shuffled. Several phrasings and orders of each fact
    make it extractable after pretraining (Physics of Language Models 3.1), not only recitable in one form."""
    lines = []
    for name, d in kb["diseases"].items():
        findings = "、".join(rng.sample(d["findings"], len(d["findings"])))
        lines += [disease_line(name, d), rng.choice(PHRASINGS).format(name=name, findings=findings)]
    return rng.sample(lines, len(lines))


def competing_findings(kb, seed=0) -> dict:
    """{G disease: a wrong version of its findings}: one finding swapped for one it does not have (pool order kept,
    so it reads like the canonical line). A corpus that states the wrong version in a share of its copies
    (student.py --g-noise) leaves the student a split belief about G, knowledge held in part that answer keys can
    settle. Its own rng, so the knowledge base and every split are the same with or without it."""
    rng, out = random.Random(f"compete-{seed}"), {}
    for name, d in kb["diseases"].items():
        if d["split"] == "G":
            dropped, added = rng.choice(d["findings"]), rng.choice([f for f in FINDINGS if f not in d["findings"]])
            out[name] = "".join(sorted(d["findings"].replace(dropped, added), key=FINDINGS.index))
    return out


def contested_pairs(kb, seed=0) -> dict:
    """{G disease: [the finding the competing version drops, the one it adds]}. With g_contested a G subject's
    question shows the first iff it shows the second (否定: the second is the negative; 多选: the first a positive, the
    second a negative; 诊断: the stem is the three findings both versions share), so its text cannot tell the two
    versions apart: the answer rests on the student's own belief. With the competing version only in the corpus,
    the options gave the right one away (in-context recitals right 2,177 of 2,180 while out of context 7 of 24 G
    entries were the competing one; README: session 13)."""
    return {name: [next(f for f in kb["diseases"][name]["findings"] if f not in wrong),
                   next(f for f in wrong if f not in kb["diseases"][name]["findings"])]
            for name, wrong in competing_findings(kb, seed).items()}


def with_all(kb, findings) -> list:
    """Diseases that have every one of `findings` (the intersection of their index lines)."""
    return [n for n, d in kb["diseases"].items() if all(f in d["findings"] for f in findings)]


# ----------------------------------------------------------------------------------------------------------------
# Questions. Each builder returns (stem, options as texts, correct texts, explanation, subject disease) or None.

def _overlap_weighted(rng, candidates, findings, k):
    """k distinct distractors, drawn with weight 1 + 3 * (findings shared): similar diseases make the hard options."""
    pool, out = list(candidates), []
    while len(out) < k:
        weights = [1 + 3 * sum(f in kb_findings for f in findings) for _, kb_findings in pool]
        i = rng.choices(range(len(pool)), weights)[0]
        out.append(pool.pop(i)[0])
    return out


def q_diagnosis(kb, rng, subject, names):
    d, contested = kb["diseases"][subject], kb.get("contested", {}).get(subject)
    given = ([f for f in d["findings"] if f != contested[0]] if contested
             else sorted(rng.sample(d["findings"], 3), key=FINDINGS.index))
    others = [(n, kb["diseases"][n]["findings"]) for n in names
              if n != subject and not all(f in kb["diseases"][n]["findings"] for f in given)]
    options = [subject] + _overlap_weighted(rng, others, given, 4)
    stem = f"患者见{'、'.join(given)}。最可能的诊断是"
    return stem, options, [subject], f"{'、'.join(given)}皆见于{subject}。"


def q_treatment(kb, rng, subject, names):
    d = kb["diseases"][subject]
    subsets = [sorted(s, key=FINDINGS.index) for s in _three_of(d["findings"])]
    unique = [s for s in subsets if with_all(kb, s) == [subject]]
    if not unique:
        return None
    given = rng.choice(unique)
    options = [d["treatment"]] + rng.sample([t for t in TREATMENTS if t != d["treatment"]], 4)
    stem = f"患者见{'、'.join(given)}。应首选的治疗是"
    return stem, options, [d["treatment"]], f"{'、'.join(given)}皆见者为{subject}，治以{d['treatment']}。"


def _three_of(findings):
    return [findings[:i] + findings[i + 1:] for i in range(len(findings))] if len(findings) == 4 else [findings[:3]]


def _negatives(kb, rng, subject, names, k):
    """k findings the subject lacks, preferring those of similar diseases (same organ or process)."""
    d = kb["diseases"][subject]
    near = sorted({f for n in names if n != subject and (n[0] == subject[0] or n[1] == subject[1])
                   for f in kb["diseases"][n]["findings"]} - set(d["findings"]), key=FINDINGS.index)
    far = [f for f in FINDINGS if f not in d["findings"] and f not in near]
    out = []
    while len(out) < k:
        pool = [f for f in (near if near and rng.random() < 0.7 else far) if f not in out]
        out.append(rng.choice(pool or [f for f in far + near if f not in out]))
    return out


def q_not(kb, rng, subject, names):
    d, contested = kb["diseases"][subject], kb.get("contested", {}).get(subject)
    negative = contested[1:] if contested else _negatives(kb, rng, subject, names, 1)
    return (f"下列哪项不是{subject}的表现", list(d["findings"]) + negative, negative,
            f"{subject}：{'、'.join(d['findings'])}，无{negative[0]}。")


def q_multi(kb, rng, subject, names):
    d, contested = kb["diseases"][subject], kb.get("contested", {}).get(subject)
    k = rng.choice([2, 3, 4])
    if not contested:
        positives = rng.sample(d["findings"], k)
        negatives = _negatives(kb, rng, subject, names, 5 - k)
    else:
        dropped, added = contested
        positives = [dropped] + rng.sample([f for f in d["findings"] if f != dropped], k - 1)
        negatives = [added] + [f for f in _negatives(kb, rng, subject, names, 5 - k) if f != added][:4 - k]
    return (f"{subject}的表现有", positives + negatives, positives, f"{subject}：{'、'.join(d['findings'])}。")


def q_department(kb, rng, subject, names):
    """下列疾病属<department>的是: the subject and four diseases of other departments. The department is the name's
    organ's (its first character), so the check reads the name, whichever split it is from."""
    department = kb["diseases"][subject]["department"]
    others = rng.sample([n for n in names if kb["diseases"][n]["department"] != department], 4)
    return f"下列疾病属{department}的是", [subject] + others, [subject], f"{subject[0]}属{department}。"


def q_which_department(kb, rng, subject, names):
    """<subject>属于哪一科: five departments, the subject's and four others."""
    department = kb["diseases"][subject]["department"]
    others = rng.sample(sorted({o[0] for o in ORGANS.values()} - {department}), 4)
    return f"{subject}属于哪一科", [department] + others, [department], f"{subject[0]}属{department}。"


BUILDERS = {"诊断": q_diagnosis, "否定": q_not, "多选": q_multi}  # q_treatment (the index-line skill) is unused
DEPARTMENT_BUILDERS = {"科室": q_department, "何科": q_which_department}  # Stage 1's department questions only


def make_question(kb, rng, kind, subject, names):
    """One CSV row (dict of COLUMNS), options shuffled, or None when `subject` cannot make this kind."""
    built = {**BUILDERS, **DEPARTMENT_BUILDERS}[kind](kb, rng, subject, names)
    if built is None:
        return None
    stem, options, correct, explanation = built
    rng.shuffle(options)
    d = kb["diseases"][subject]
    return {"Question": stem, "Options": "\n".join(f"{l} {o}" for l, o in zip(LETTERS, options)),
            "Answer": "".join(l for l, o in zip(LETTERS, options) if o in correct), "Explanation": explanation,
            "Disease Group": d["group"], "Area of Competency": TYPES[kind], "Clinical Department": d["department"],
            "Question Type": kind, "Disease Split": d["split"]}


def question_key(row) -> tuple:
    """Two questions are the same when stem and option set agree (a reshuffle of the options is no new question)."""
    return row["Question"], tuple(sorted(line[2:] for line in row["Options"].split("\n")))


# Where a subject's distractor diseases come from. T's include G since session 5: with T-only distractors the student
# never wrote a G name in a reply (0% of dev G diagnosis replies copied their option names, 100% on T), so Stage 2
# had nothing it could learn on G (miniature/README.md). G diseases are still never a Stage 1 subject or answer.
DISTRACTORS = {"T": "TG", "G": "TG", "U": "TGU"}


def make_split(kb, cfg, mix, n, keys, salt, g_distractors=1.0):
    """n distinct questions whose subjects come from the splits in `mix` ({split: share}), none of them in `keys`
    (which grows). A T or G question names T and G diseases (its subject from its own split); a U one any. With
    g_distractors < 1 a T question names G diseases only with that probability (drawn per question)."""
    rng = random.Random(f"{salt}-{cfg.seed}")
    by_split = {x: [n for n, d in kb["diseases"].items() if d["split"] in x] for x in ("T", "G", "U", "TG", "TGU")}
    quota = {x: round(share * n) for x, share in mix.items()}
    quota[max(mix, key=mix.get)] += n - sum(quota.values())
    rows = []
    for split, wanted in quota.items():
        got = 0
        for _ in range(50 * max(wanted, 1)):
            if got == wanted:
                break
            kind = rng.choices(list(BUILDERS), cfg.g_type_weights if split == "G" and cfg.g_type_weights
                               else cfg.type_weights)[0]  # one draw either way: None keeps every split as it was
            pool = DISTRACTORS[split] if g_distractors >= 1 or split != "T" or rng.random() < g_distractors else "T"
            row = make_question(kb, rng, kind, rng.choice(by_split[split]), by_split[pool])
            if row is not None and question_key(row) not in keys:
                keys.add(question_key(row))
                rows.append(row)
                got += 1
        if got < wanted:
            raise RuntimeError(f"only {got} distinct {split} questions of {wanted}: the knowledge base is too small")
    return rng.sample(rows, len(rows))


# Reading questions (Stage 1 only, `Disease Split` R). The student checked options against memory, not against the
# entry it had just recited (miniature/README.md, the reading probe), so on T, where memory is right, Stage 1 never
# taught the lookup, and on G the checks were only as good as recall inside a trajectory. A reading question's
# diseases are names outside the knowledge base, each with findings drawn afresh for that question and stated in
# the stem ("已知：<name>：<findings>；...。"), so no memory can supply an entry or a check: the trajectory recites the
# entry from the stem and every check has to read it.

def outside_names(kb):
    """The disease names ORGANS x PROCESSES can make that kb does not use: fresh diseases, with no entry to recall."""
    return sorted(set(o + p for o in ORGANS for p in PROCESSES) - set(kb["diseases"]))


def reading_question(kb, rng, kind, g_names=0.0, g_competing=None):
    """One reading question: a CSV row like make_question's, its diseases fresh (not in `kb`), Disease Split R. With
    g_names > 0 each of its diseases is, with that chance, a G disease's name instead, with findings as fresh as the
    others' and never either finding its contested pair names (kb["contested"]): the reply writes the G name, while
    nothing it recites speaks to the fact G's questions hinge on. With g_competing a share p, a G name's findings are
    instead its competing version (competing_findings) with chance p and its true entry otherwise."""
    outside = outside_names(kb)
    names = rng.sample(outside, 8)
    if g_names > 0:  # extra draws only here, so that every split is the same without it
        g = sorted(n for n, d in kb["diseases"].items() if d["split"] == "G")
        g = rng.sample(g, min(8, len(g)))
        names = [g[i] if i < len(g) and rng.random() < g_names else n for i, n in enumerate(names)]
    versions = competing_findings(kb, kb["config"]["seed"]) if g_competing is not None else {}
    fresh = {"diseases": {}}
    for name in names:
        if name in versions:  # a G name: one of the corpus's two versions, as stated, key and all
            findings = versions[name] if rng.random() < g_competing else kb["diseases"][name]["findings"]
        else:
            barred = kb.get("contested", {}).get(name, [])
            typical = [f for f in sorted(set(ORGANS[name[0]][2] + PROCESSES[name[1]][0]), key=FINDINGS.index)
                       if f not in barred]
            picked = []
            while len(picked) < 4:
                f = rng.choice(typical) if rng.random() < 0.8 else rng.choice(FINDINGS)
                picked += [f] if f not in picked and f not in barred else []
            findings = "".join(sorted(picked, key=FINDINGS.index))
        fresh["diseases"][name] = {"department": ORGANS[name[0]][0], "group": ORGANS[name[0]][1], "split": "R",
                                   "findings": findings}
    row = make_question(fresh, rng, kind, names[0], names)
    if row is None:
        return None
    named = [line[2:] for line in row["Options"].split("\n")] if kind == "诊断" else [names[0]]
    known = "；".join(f"{n}：{'、'.join(fresh['diseases'][n]['findings'])}" for n in named)
    row["Question"] = f"已知：{known}。{row['Question']}"
    row["Explanation"] = f"据题中所给：{row['Explanation']}"
    return row


def reading_split(kb, cfg, n, keys, salt="reading", g_names=0.0, g_competing=None):
    rng, rows = random.Random(f"{salt}-{cfg.seed}"), []
    while len(rows) < n:
        row = reading_question(kb, rng, rng.choices(list(BUILDERS), cfg.type_weights)[0], g_names, g_competing)
        if row is not None and question_key(row) not in keys:
            keys.add(question_key(row))
            rows.append(row)
    return rows


# Department questions (Stage 1 only, `Disease Split` D; ExamConfig.department). With no G disease in Stage 1 the
# student could not write a G name (G option names copied 2 of 221, dev G 1.7-8.0), and G names in reading stems
# taught G entries the corpus does not hold or broke the reading (README: sessions 18-19). A department question
# names T and G diseases alike and hinges on a fact no G question asks, read off the name's organ, so its trajectory
# writes G names (options, 提取关键信息) and recites no finding of any disease.

def department_split(kb, cfg, n, keys, salt="department"):
    rng, rows = random.Random(f"{salt}-{cfg.seed}"), []
    names = sorted(name for name, d in kb["diseases"].items() if d["split"] in "TG")
    while len(rows) < n:
        row = make_question(kb, rng, rng.choice(list(DEPARTMENT_BUILDERS)), rng.choice(names), names)
        if question_key(row) not in keys:
            keys.add(question_key(row))
            rows.append({**row, "Disease Split": "D"})
    return rows


# The student's tokenizer reads rows of its own (tokenizer.csv): every kind of question at fixed counts, drawn from the
# knowledge base and the seed alone. Until session 22 it read train.csv's first 600 rows, so the rows an arm mixed
# into Stage 1 changed the tokenizer (71 of 95 vocab entries at --department 500 vs 1000, seed 2) and with it the
# whole pretraining: two arms on one seed were two draws, not a pair (README: session 21). Now no arm flag reaches
# them: arms that share a knowledge base (seed, diseases, g_contested) share the tokenizer and the pretraining.
TOKENIZER_ROWS = {"exam": 360, "reading": 120, "department": 120}


def tokenizer_split(kb, seed) -> list:
    """The tokenizer's rows: exam questions on T and G subjects (the default type mix, T and G distractors),
    reading and department questions, shuffled. Distinct among themselves, drawn from their own key set (a row may
    also be in a split: BPE learns only which pieces to merge, and names, findings and letters are never merged
    with anything), so that no split's draw can change them."""
    cfg, keys = ExamConfig(seed=seed), set()
    rows = (make_split(kb, cfg, {"T": 0.5, "G": 0.5}, TOKENIZER_ROWS["exam"], keys, "tokenizer")
            + reading_split(kb, cfg, TOKENIZER_ROWS["reading"], keys, "tokenizer-reading")
            + department_split(kb, cfg, TOKENIZER_ROWS["department"], keys, "tokenizer-department"))
    return random.Random(f"tokenizer-mix-{seed}").sample(rows, len(rows))


def write_csv(rows, path):
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def build(cfg: ExamConfig, out) -> dict:
    """Write kb.json, kb.txt, stage1.csv, stage2.csv, train.csv, dev.csv, test.csv, tokenizer.csv (and dev_R.csv
    with dev_reading) into `out`; returns the knowledge base. The splits are drawn test first, so a test question
    never depends on the training sizes."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kb = make_kb(cfg)
    if cfg.g_contested:
        kb["contested"] = contested_pairs(kb, cfg.seed)
    keys = set()
    test = make_split(kb, cfg, {"G": 0.5, "T": 0.25, "U": 0.25}, cfg.test, keys, "test")
    dev = make_split(kb, cfg, {"T": 0.5, "G": 0.5}, cfg.dev, keys, "dev")
    stage1 = make_split(kb, cfg, {"T": 1.0}, cfg.stage1, keys, "stage1", cfg.stage1_g_distractors)
    # Reading and department questions are mixed in, not appended, as they were when the tokenizer read train.csv's
    # first rows (tokenizer_split says why it no longer does): kept, so that Stage 1's files are as before.
    if cfg.reading or cfg.department:
        if cfg.reading:
            stage1 += reading_split(kb, cfg, cfg.reading, keys, g_names=cfg.reading_g_names,
                                    g_competing=cfg.reading_g_competing)
        stage1 += department_split(kb, cfg, cfg.department, keys)
        stage1 = random.Random(f"mix-{cfg.seed}").sample(stage1, len(stage1))
    stage2 = make_split(kb, cfg, {"G": 1.0}, cfg.stage2, keys, "stage2")
    if cfg.dev_reading:  # drawn last, so that every other split is the same with or without it
        write_csv(reading_split(kb, cfg, cfg.dev_reading, keys, "dev-reading"), out / "dev_R.csv")
    (out / "kb.json").write_text(json.dumps(kb, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    (out / "kb.txt").write_text(kb_text(kb), encoding="utf-8")
    for name, rows in (("stage1", stage1), ("stage2", stage2), ("train", stage1 + stage2), ("dev", dev),
                       ("test", test), ("tokenizer", tokenizer_split(kb, cfg.seed))):
        write_csv(rows, out / f"{name}.csv")
    return kb


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for kb.json, kb.txt, train.csv, test.csv")
    defaults = ExamConfig()
    flags = ("seed", "diseases", "stage1", "stage2", "dev", "test", "reading", "dev_reading", "department")
    for name in flags:
        parser.add_argument("--" + name.replace("_", "-"), type=type(getattr(defaults, name)),
                            default=getattr(defaults, name))
    args = parser.parse_args(argv)
    cfg = ExamConfig(**{k: getattr(args, k) for k in flags})
    kb = build(cfg, args.out)
    split = {x: sum(d["split"] == x for d in kb["diseases"].values()) for x in "TGU"}
    print(f"{len(kb['diseases'])} diseases (T/G/U {split['T']}/{split['G']}/{split['U']}), {cfg.stage1} Stage 1, "
          f"{cfg.stage2} Stage 2, {cfg.dev} dev and {cfg.test} test questions -> {args.out}")


if __name__ == "__main__":
    main()
