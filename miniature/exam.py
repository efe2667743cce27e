"""A synthetic clinical exam in CMExam's own CSV format, generated from a seed: the miniature's task.

The miniature (issue 6) runs the whole MedCritical method on 2 CPU cores. Its exam must need several reasoning steps
over knowledge the student has to recall (it is not in the question), so that a well-trained tiny student still gets
some steps wrong. A knowledge base of diseases (two-character names such as 肺炎), each with a department, four
findings (single characters such as 热, 咳) drawn mostly from its organ's and its process's typical findings, so that
diseases overlap and a question needs comparing options, and a treatment. Four question types:

    诊断       患者见热、咳、喘。最可能的诊断是        five diseases; one has all three findings
    诊断-治疗  患者见热、咳、喘。应首选的治疗是        diagnose among ALL diseases (intersection), then treat
    否定       下列哪项不是肺炎的表现                  five findings, four belong to the disease
    多选       肺炎的表现有                            two to four of five findings belong (multiple answer)

Splits: train and test hold no common question (same stem and option set); diseases held out as "unseen" appear in
no training question as subject or option, only in the knowledge text, so the test's unseen half measures knowledge
recalled from pretraining. Files: train.csv and test.csv (CMExam columns plus annotation columns, so
templates.load_cmexam and eval_cmexam.py read them unchanged), kb.json (for the teacher) and kb.txt (pretraining).

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
TYPES = {"诊断": "诊断", "诊断-治疗": "治疗", "否定": "临床表现", "多选": "临床表现"}  # type: Area of Competency
COLUMNS = ["Question", "Options", "Answer", "Explanation", "Disease Group", "Area of Competency",
           "Clinical Department", "Question Type", "Seen In Training"]
LETTERS = "ABCDE"


@dataclass
class ExamConfig:
    seed: int = 0
    diseases: int = 60
    findings_per_disease: int = 4
    max_per_finding: int = 7  # caps how many diseases share a finding: keeps the index lines ("热见于：...") short
    unseen_fraction: float = 0.2  # diseases in no training question, only in kb.txt (and in the test split)
    train: int = 4000
    test: int = 1000
    type_weights: tuple = (0.3, 0.25, 0.25, 0.2)  # 诊断, 诊断-治疗, 否定, 多选


# ----------------------------------------------------------------------------------------------------------------
# The knowledge base

def make_kb(cfg: ExamConfig) -> dict:
    """{"diseases": {name: {department, group, findings (pool order), treatment, seen}}, "index": {finding: [names]}}."""
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
    unseen = set(rng.sample(chosen, round(cfg.unseen_fraction * len(chosen))))
    for name, d in diseases.items():
        d["seen"] = name not in unseen
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
    d = kb["diseases"][subject]
    given = sorted(rng.sample(d["findings"], 3), key=FINDINGS.index)
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
    d = kb["diseases"][subject]
    negative = _negatives(kb, rng, subject, names, 1)
    return (f"下列哪项不是{subject}的表现", list(d["findings"]) + negative, negative,
            f"{subject}：{'、'.join(d['findings'])}，无{negative[0]}。")


def q_multi(kb, rng, subject, names):
    d = kb["diseases"][subject]
    positives = rng.sample(d["findings"], rng.choice([2, 3, 4]))
    return (f"{subject}的表现有", positives + _negatives(kb, rng, subject, names, 5 - len(positives)), positives,
            f"{subject}：{'、'.join(d['findings'])}。")


BUILDERS = {"诊断": q_diagnosis, "诊断-治疗": q_treatment, "否定": q_not, "多选": q_multi}


def make_question(kb, rng, kind, subject, names):
    """One CSV row (dict of COLUMNS), options shuffled, or None when `subject` cannot make this kind."""
    built = BUILDERS[kind](kb, rng, subject, names)
    if built is None:
        return None
    stem, options, correct, explanation = built
    rng.shuffle(options)
    d = kb["diseases"][subject]
    involved = {subject} | {o for o in options if o in kb["diseases"]}
    return {"Question": stem, "Options": "\n".join(f"{l} {o}" for l, o in zip(LETTERS, options)),
            "Answer": "".join(l for l, o in zip(LETTERS, options) if o in correct), "Explanation": explanation,
            "Disease Group": d["group"], "Area of Competency": TYPES[kind], "Clinical Department": d["department"],
            "Question Type": kind, "Seen In Training": "是" if all(kb["diseases"][n]["seen"] for n in involved) else "否"}


def question_key(row) -> tuple:
    """Two questions are the same when stem and option set agree (a reshuffle of the options is no new question)."""
    return row["Question"], tuple(sorted(line[2:] for line in row["Options"].split("\n")))


def make_split(kb, cfg, n, seen_only, exclude, salt):
    """n distinct questions not in `exclude`: training ones only about seen diseases; test ones half about seen,
    half with an unseen subject (when there are unseen diseases)."""
    rng = random.Random(f"{salt}-{cfg.seed}")
    all_names = list(kb["diseases"])
    seen = [n for n in all_names if kb["diseases"][n]["seen"]]
    unseen = [n for n in all_names if not kb["diseases"][n]["seen"]]
    rows, keys = [], set(exclude)
    for attempt in range(50 * n):
        if len(rows) == n:
            break
        kind = rng.choices(list(BUILDERS), cfg.type_weights)[0]
        if seen_only or not unseen or len(rows) % 2 == 0:
            subject, names = rng.choice(seen), seen
        else:
            subject, names = rng.choice(unseen), all_names
        row = make_question(kb, rng, kind, subject, names)
        if row is not None and question_key(row) not in keys:
            keys.add(question_key(row))
            rows.append(row)
    if len(rows) < n:
        raise RuntimeError(f"only {len(rows)} distinct questions of {n}: the knowledge base is too small")
    return rows


def write_csv(rows, path):
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def build(cfg: ExamConfig, out) -> dict:
    """Write kb.json, kb.txt, train.csv, test.csv into `out`; returns the knowledge base."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kb = make_kb(cfg)
    train = make_split(kb, cfg, cfg.train, True, set(), "train")
    test = make_split(kb, cfg, cfg.test, False, {question_key(r) for r in train}, "test")
    (out / "kb.json").write_text(json.dumps(kb, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    (out / "kb.txt").write_text(kb_text(kb), encoding="utf-8")
    write_csv(train, out / "train.csv")
    write_csv(test, out / "test.csv")
    return kb


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for kb.json, kb.txt, train.csv, test.csv")
    defaults = ExamConfig()
    for name in ("seed", "diseases", "unseen_fraction", "train", "test"):
        parser.add_argument("--" + name.replace("_", "-"), type=type(getattr(defaults, name)),
                            default=getattr(defaults, name))
    args = parser.parse_args(argv)
    cfg = ExamConfig(seed=args.seed, diseases=args.diseases, unseen_fraction=args.unseen_fraction,
                     train=args.train, test=args.test)
    kb = build(cfg, args.out)
    print(f"{len(kb['diseases'])} diseases, {cfg.train} train and {cfg.test} test questions -> {args.out}")


if __name__ == "__main__":
    main()
