"""templates.py: chat template, label mask, CMExam loading, prompts, answer extraction."""
import csv
import json
from pathlib import Path

import pytest

import templates as T

SHARED = Path(__file__).resolve().parents[2] / "shared"
TOKENIZER_DIR = SHARED / "data" / "qwen2.5-tokenizer"
VAL_CSV = SHARED / "data" / "cmexam" / "val.csv"
SAMPLE_CSV = Path(__file__).resolve().parent / "data" / "cmexam_sample.csv"

ROW = {"id": 7, "question": "夜间阵发性呼吸困难，可见于", "answer": "E",
       "options": {"A": "急性脑血管疾病", "B": "癔病", "C": "急性感染所致的毒血症", "D": "慢性阻塞性肺气肿", "E": "左心功能不全"}}
MULTI_ROW = {**ROW, "answer": "DE"}


@pytest.fixture(scope="module")
def qwen_tokenizer():
    if not (TOKENIZER_DIR / "tokenizer.json").exists():
        pytest.skip("../shared/data/qwen2.5-tokenizer not present")
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))


@pytest.fixture(scope="module")
def mini_tokenizer():
    """A miniature byte-level BPE that keeps Qwen's special tokens as strings, at other ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([T.chat(T.student_messages(ROW)), T.EXEMPLAR_SOLUTION], trainer)
    return tok


# ----------------------------------------------------------------------------------------------------------------
# chat template

CONVERSATIONS = [
    [{"role": "user", "content": "你好"}],
    [{"role": "system", "content": "你是医生。"}, {"role": "user", "content": "头痛怎么办？"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>\nb\n</think>\n答案：C"},
     {"role": "user", "content": "再想想"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "x\n\ny "},
     {"role": "system", "content": "late system"}, {"role": "user", "content": ""}],
    T.student_messages(ROW),
    T.teacher_messages(MULTI_ROW, hint_answer="DE"),
    T.critique_messages(ROW, "<think>\n……\n</think>\n答案：D"),
]


def test_chat_text_by_hand():
    messages = [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}]
    assert T.chat(messages, add_generation_prompt=False) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n问<|im_end|>\n<|im_start|>assistant\n答<|im_end|>\n")
    assert T.chat(messages[:1]).endswith("<|im_start|>user\n问<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError):
        T.chat([{"role": "tool", "content": "{}"}])
    with pytest.raises(ValueError):
        T.chat([])


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_equals_transformers(add_generation_prompt):
    if not (TOKENIZER_DIR / "tokenizer_config.json").exists():
        pytest.skip("../shared/data/qwen2.5-tokenizer not present")
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    for messages in CONVERSATIONS:
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert T.chat(messages, add_generation_prompt) == expected


def test_chat_equals_jinja_file():
    """The same check against the .jinja file itself with plain jinja2, if transformers is away."""
    jinja2 = pytest.importorskip("jinja2")
    path = TOKENIZER_DIR / "Qwen-Qwen2.5-7B-Instruct.jinja"
    if not path.exists():
        pytest.skip("../shared/data/qwen2.5-tokenizer not present")
    template = jinja2.Environment().from_string(path.read_text())
    for messages in CONVERSATIONS:
        for gen in (True, False):
            assert T.chat(messages, gen) == template.render(messages=messages, add_generation_prompt=gen)


def test_special_ids(qwen_tokenizer):
    assert T.special_ids(qwen_tokenizer) == {"im_start": T.IM_START_ID, "im_end": T.IM_END_ID,
                                             "endoftext": T.ENDOFTEXT_ID}
    assert set(T.STOP_IDS) == {151645, 151643}


def test_special_ids_are_looked_up_not_assumed(mini_tokenizer):
    assert T.special_ids(mini_tokenizer) == {"endoftext": 0, "im_start": 1, "im_end": 2}
    from tokenizers import Tokenizer, models
    with pytest.raises(ValueError, match="special tokens"):
        T.special_ids(Tokenizer(models.BPE()))


# ----------------------------------------------------------------------------------------------------------------
# label mask

def _check_mask(tokenizer, messages):
    ids, mask = T.encode_chat(tokenizer, messages)
    im_end = T.special_ids(tokenizer)["im_end"]
    assert len(ids) == len(mask)
    # the trained tokens are, in order, exactly each assistant reply followed by its <|im_end|>
    replies = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == "".join(replies)
    assert sum(m and i == im_end for i, m in zip(ids, mask)) == len(replies)
    for k in range(len(ids) - 1):  # every trained run ends on <|im_end|>, and the "\n" after it is not trained
        if mask[k] and not mask[k + 1]:
            assert ids[k] == im_end and tokenizer.decode([ids[k + 1]]) == "\n"
    return ids, mask


@pytest.mark.parametrize("tokenizer_name", ["qwen_tokenizer", "mini_tokenizer"])
def test_label_mask_covers_exactly_the_assistant_tokens(tokenizer_name, request):
    tokenizer = request.getfixturevalue(tokenizer_name)
    conversations = [T.student_messages(ROW) + [{"role": "assistant", "content": T.EXEMPLAR_SOLUTION}],
                     CONVERSATIONS[2] + [{"role": "assistant", "content": " 答案：AB "}], CONVERSATIONS[3]]
    for messages in conversations:
        ids, _ = _check_mask(tokenizer, messages)
        # pieces concatenated == the whole text tokenized in one go
        assert ids == tokenizer.encode(T.chat(messages, False), add_special_tokens=False).ids
        # and the prompt part == what inference tokenizes before generating the first reply
        first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = tokenizer.encode(T.chat(messages[:first]), add_special_tokens=False).ids
        assert ids[:len(prompt)] == prompt


def test_label_mask_on_every_sample_question(qwen_tokenizer):
    for row in T.load_cmexam(SAMPLE_CSV):
        messages = T.student_messages(row) + [{"role": "assistant", "content": f"<think>\n{row['Explanation']}\n"
                                               f"</think>\n答案：{row['answer']}"}]
        ids, _ = _check_mask(qwen_tokenizer, messages)
        assert ids == qwen_tokenizer.encode(T.chat(messages, False), add_special_tokens=False).ids


def test_reply_starting_with_newline_is_tokenized_as_inference_sees_it(qwen_tokenizer):
    """The one documented divergence from whole-text tokenization: Qwen's pre-tokenizer would merge the "\\n"
    after "assistant" with the reply's leading newline, a token the model can never produce after the prompt."""
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\n答案：A"}]
    ids, mask = _check_mask(qwen_tokenizer, messages)
    prompt = qwen_tokenizer.encode(T.chat(messages[:1]), add_special_tokens=False).ids
    assert ids[:len(prompt)] == prompt and not any(mask[:len(prompt)]) and all(mask[len(prompt):-1])
    assert ids != qwen_tokenizer.encode(T.chat(messages, False), add_special_tokens=False).ids


# ----------------------------------------------------------------------------------------------------------------
# CMExam loading

def test_real_val_split_loads_with_the_one_bad_row_skipped():
    if not VAL_CSV.exists():
        pytest.skip("../shared/data/cmexam/val.csv not present")
    rows, skipped = T.load_cmexam(VAL_CSV, return_skipped=True)
    # pandas wrote the one missing answer as "nan": row 5356 (0-based), starting on physical line 26678
    assert skipped == [("line 26678", "no answer")]
    assert len(rows) == 6810 and [r["id"] for r in rows] == [i for i in range(6811) if i != 5356]
    assert sum(len(r["answer"]) > 1 for r in rows) == 210  # 35 + 96 + 61 + 18 with 2, 3, 4, 5 answers
    assert sum(len(r["options"]) == 4 for r in rows) == 205
    assert all(set(r["answer"]) <= set(r["options"]) and r["question"] and "Explanation" in r for r in rows)
    assert rows[0]["options"]["B"] == "出血部位" and rows[0]["answer"] == "C"


def test_sample_csv_loads(caplog):
    rows, skipped = T.load_cmexam(SAMPLE_CSV, return_skipped=True)
    assert len(rows) == 29 and [reason for _, reason in skipped] == ["no answer"]
    assert "no answer" in caplog.text and skipped[0][0] in caplog.text
    assert {len(r["options"]) for r in rows} == {4, 5}
    assert sorted(r["answer"] for r in rows if len(r["answer"]) > 1) == ["ABC", "ABCDE", "BC", "BCDE", "DE"]
    assert rows[0] == {"id": 0, "question": "上消化道出血可单纯表现为呕血或黑便，也可两者兼有，这取决于",
                       "options": {"A": "原发病", "B": "出血部位", "C": "出血量", "D": "在胃内停留时间", "E": "以上均非"},
                       "answer": "C", "Explanation": rows[0]["Explanation"]}


def test_test_file_annotation_columns_are_kept(tmp_path):
    columns = ["Question", "Options", "Answer", "Explanation", "Disease Group", "Area of Competency",
               "Clinical Department", "Medical Discipline", "Difficulty level"]
    path = tmp_path / "test.csv"
    with open(path, "w", encoding="utf-8-sig", newline="") as f:
        csv.writer(f).writerows([columns, ["题干", "A 甲\nB 乙", "B", "解析", "循环系统疾病", "医学知识", "内科",
                                           "临床医学", "3"]])
    row, = T.load_cmexam(path)
    assert row["answer"] == "B" and row["Difficulty level"] == "3" and row["Clinical Department"] == "内科"


BAD_AND_GOOD = [
    ({"Question": "好题", "Options": "Ａ 甲\nb. 乙\nC、丙", "Answer": "ｃ，a"}, None),  # full width, lower case
    ({"Question": "字面换行", "Options": "A 甲\\nB 乙", "Answer": "B"}, None),
    ({"Question": "  ", "Options": "A 甲\nB 乙", "Answer": "A"}, "empty question"),
    ({"Question": "无选项", "Options": "", "Answer": "A"}, "no options"),
    ({"Question": "无答案", "Options": "A 甲\nB 乙", "Answer": None}, "no answer"),
    ({"Question": "答案越界", "Options": "A 甲\nB 乙", "Answer": "C"}, "answer C not among options AB"),
    ({"Question": "坏答案", "Options": "A 甲\nB 乙", "Answer": "甲"}, "invalid answer '甲'"),
    ({"Question": "坏选项", "Options": "A 甲\n乙", "Answer": "A"}, "unparseable options (line '乙')"),
    ({"Question": "重复选项", "Options": "A 甲\nA 乙", "Answer": "A"}, "unparseable options (line 'A 乙')"),
]


def test_json_and_jsonl_load_the_same_rows(tmp_path):
    records = [record for record, _ in BAD_AND_GOOD]
    (tmp_path / "q.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n{oops\n",
                                      encoding="utf-8")
    rows, skipped = T.load_cmexam(tmp_path / "q.json", return_skipped=True)
    assert [r["options"] for r in rows] == [{"A": "甲", "B": "乙", "C": "丙"}, {"A": "甲", "B": "乙"}]
    assert [r["answer"] for r in rows] == ["AC", "B"] and [r["id"] for r in rows] == [0, 1]
    assert [reason for _, reason in skipped] == [reason for _, reason in BAD_AND_GOOD[2:]]
    assert skipped[0][0] == "item 2"
    rows_jsonl, skipped_jsonl = T.load_cmexam(tmp_path / "q.jsonl", return_skipped=True)
    assert rows_jsonl == rows
    assert skipped_jsonl[0] == ("line 3", "empty question") and skipped_jsonl[-1] == ("line 10", "invalid JSON")


def test_our_own_jsonl_with_parsed_options(tmp_path):
    row = {"id": "cm-17", "question": "题", "options": {"B": "乙", "a": "甲"}, "answer": "b", "source": "x"}
    path = tmp_path / "ours.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    assert T.load_cmexam(path) == [{"id": "cm-17", "question": "题", "options": {"A": "甲", "B": "乙"},
                                    "answer": "B", "source": "x"}]


def test_missing_file_and_missing_columns_are_clear_errors(tmp_path):
    with pytest.raises(T.UserError, match="nope.csv"):
        T.load_cmexam(tmp_path / "nope.csv")
    path = tmp_path / "cols.csv"
    path.write_text("Question,Explanation\n题,解析\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"cols.csv.*\['Options', 'Answer'\]"):
        T.load_cmexam(path)
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="missing required"):
        T.load_cmexam(tmp_path / "empty.jsonl")


# ----------------------------------------------------------------------------------------------------------------
# answer extraction: hand-written outputs, hand-decided answers

EXTRACTION_CASES = [
    ("答案：A", "A"), ("答案:B", "B"), ("答案是C", "C"), ("答案为 D", "D"), ("正确答案：E", "E"),
    ("最终答案：AC", "AC"), ("参考答案：B", "B"), ("最终答案应为C。", "C"), ("故选B", "B"), ("本题选BD", "BD"),
    ("综上所述，应选C。", "C"), ("所以选 E 。", "E"), ("Answer: A", "A"), ("the answer is (B).", "B"),
    ("The correct answer is D", "D"), ("Final Answer: C", "C"), ("<answer>C</answer>", "C"), ("<answer> a </answer>", "A"),
    ("**答案：A**", "A"), ("**答案**：B", "B"), ("答案：**C**", "C"), ("最终答案是 **D**", "D"), (r"$\boxed{B}$", "B"),
    ("答案：Ａ", "A"), ("答案：ｂ", "B"), ("答案：（Ｄ）", "D"), ("答案：A、C、E", "ACE"), ("答案：A，C", "AC"),
    ("答案：A,C", "AC"), ("答案：A和C", "AC"), ("答案：A及D", "AD"), ("答案：A C", "AC"), ("Answer: A and C", "AC"),
    ("答案：CA", "AC"), ("答案：ABCDE", "ABCDE"), ("正确选项为E", "E"), ("答案为选项B", "B"), ("答案：E 晶状体", "E"),
    ("答案：B。解析：A项错误。", "B"), ("答案为A项和C项", "AC"), ("正确答案是B项", "B"), ("因此，正确答案是B和D。", "BD"),
    ("最终答案：$\\boxed{C}$", "C"), ("答案：B（急性前壁心肌梗死）", "B"), ("正确的是C", "C"), ("答案：b和d", "BD"),
    # a revised answer overrides an earlier one
    ("初步判断答案是D。\n等等，D项忽略了年龄，再检查一遍……应该是C。\n答案：C", "C"),
    ("<think>\n所以答案是A。不对，A项是禁忌证。\n</think>\n答案：B", "B"),
    ("Answer: A. Wait, that ignores the ECG. The answer is C.", "C"),
    ("答案：A\n\n修正：答案应为AB", "AB"),
    # letters merely mentioned, or no answer at all
    ("", ""), ("选项A错误，B项正确，排除C。", ""), ("A项正确", ""), ("不选A", ""), ("本题无法作答。", ""),
    ("the answer is not clear", ""), ("Answer: Cardiology", ""), ("the answer is a good one", ""),
    ("the answer is bad", ""), ("I answered each question.", ""), ("答案是A吗？", ""), ("答案：角膜", ""),
    ("选项D、E均与题干不符", ""),
    # a later clause must not be read into the answer
    ("答案：C，D项错误", "C"), ("答案是B，因为A项是禁忌", "B"), ("The answer is B because it fits.", "B"),
    # truncated inside <think>: the reasoning's last conclusion is the only reading there is
    ("<think>\n逐项分析……故选E，再核对一下", "E"),
    # exam, JSON, boxed-text and English forms that baselines write (issue 14)
    ("【答案】B", "B"), ("【答案】：E", "E"), ("答：C", "C"), ('{"answer": "C"}', "C"),
    ('```json\n{"answer": "AD", "reason": "……"}\n```', "AD"), ("答案：「C」", "C"), (r"$\boxed{\text{B}}$", "B"),
    (r"\boxed{\textbf{D}}", "D"), ("The correct option is B", "B"), ("The correct option is B.", "B"),
    ("So the answer is option D.", "D"), ("答案不是A，而是B", "B"), ("答案：A;C", "AC"), ("答案：A；C", "AC"),
    ("## Final Response\n正确答案是 **B. 急性前壁心肌梗死**", "B"),
    ("故选A而不选D（A对），若肺失肃降……此题为单选题，故选A", "A"),  # a conditional ended by a conclusion
    # the answer line wins over the explanation written after it; a restated answer still counts
    ("答案：B\n解析：本题易误选A，因为……", "B"), ("答案：C\n如果题干改为老年患者，则应选D。", "C"),
    ("答案：E\n首选B超检查可明确诊断。", "E"), ("答案：B\n（多选题按字母顺序连写，如“答案：AC”）", "B"),
    ("答案：B。\n本题应选B而非D……若选D则……故选C", "B"), ("答案：A\n解析：A项正确；选C者混淆了……", "A"),
    # hedges are no answer, even after an earlier choice
    ("答案：A或B", ""), ("答案是A还是B，难以确定", ""), ("答案：C或者D", ""), ("The answer is A or B.", ""),
    ("故选C。\n答案：A或B", ""), ("因此选择C（或D）", ""), ("答案：AB或AC", ""),
    # no letter where the model gave none
    ("首选B超检查", ""), ("应选择B超检查（A对）", ""), ("本题易误选A", ""), ("如果是儿童，则应选D", ""),
    ("若为孕妇，应选C", ""), ("最后一行写“答案：X”，如“答案：AC”", ""), ("答案不是A", ""), ("正确答案不是A", ""),
    ("原答案是D，需要重新考虑", ""), ("错误答案是A", ""), ("不能选A，因为……", ""), ('{"answer": null}', ""),
    ("答：这个问题需要结合病史。", ""), ("The correct option is a bit unclear", ""), ("答案：B超提示胆囊结石", ""),
    ("回答：患者应首选C反应蛋白检查", ""), ("血型为A型", ""),
    # misreads found in the val split's explanations (human text)
    ("故不作为首选(C错)。", ""), ("有权进行比较、鉴别和挑选(E对)。", ""), ("不作首选(BCD错)", ""), ("答案A不是固定桥结构", ""),
    ("答案B错误，固定桥的连接体", ""), ("答案E固定连接体相当于天然牙", ""), ("本例不能仅凭肿大淋巴结而误选择答案E。", ""),
]


@pytest.mark.parametrize("text, expected", EXTRACTION_CASES)
def test_extract_answer(text, expected):
    assert T.extract_answer(text) == expected


def test_enough_extraction_cases():
    assert len(EXTRACTION_CASES) >= 40


# ----------------------------------------------------------------------------------------------------------------
# prompts

def test_student_prompt_shows_the_question_and_nothing_else():
    content, = [m["content"] for m in T.student_messages(ROW)]
    assert "单项选择题" in content and "E. 左心功能不全" in content and "答案：X" in content and "<think>" in content
    assert "审题" not in content and "示例" not in content and "提示" not in content
    assert "多项选择题" in T.format_question(MULTI_ROW)


def test_teacher_prompt_has_both_templates_and_a_hint_only_when_asked():
    plain = T.teacher_messages(ROW)[0]["content"]
    assert T.HIGH_LEVEL_TEMPLATE in plain and T.DETAILED_TEMPLATE in plain and T.format_question(ROW) in plain
    assert "提示" not in plain and "正确答案是" not in plain
    assert "正确答案是E" in T.teacher_messages(ROW, hint_answer="E")[0]["content"]
    for step in ["审题", "提取关键信息", "回忆相关知识", "逐项分析各选项", "自我检查与纠正", "得出结论"]:
        assert step in T.HIGH_LEVEL_TEMPLATE and step in T.EXEMPLAR_SOLUTION
    assert T.is_well_formed(T.EXEMPLAR_SOLUTION) and T.extract_answer(T.DETAILED_TEMPLATE) == T.EXEMPLAR["answer"]


def test_critique_prompt_and_correction_extraction():
    wrong = "<think>\n夜间阵发性呼吸困难见于慢阻肺……\n</think>\n答案：D"
    content = T.critique_messages(ROW, wrong)[0]["content"]
    assert wrong in content and T.CORRECTION_MARK in content and "正确答案是" not in content
    assert "正确答案是E" in T.critique_messages(ROW, wrong, hint_answer="E")[0]["content"]
    fixed = "<think>\n左心衰竭时肺淤血……\n</think>\n答案：E"
    output = f"<think>\n原解答第二步把心源性呼吸困难误认为肺源性。\n</think>\n【错误分析】第二步错误。\n{T.CORRECTION_MARK}\n{fixed}\n"
    assert T.extract_correction(output) == fixed and T.extract_answer(T.extract_correction(output)) == "E"
    assert T.is_well_formed(T.extract_correction(output))
    assert T.extract_correction("【修正后的解答】：\n" + fixed) == fixed
    assert T.extract_correction("没有修正部分。答案：E") == ""


@pytest.mark.parametrize("text, ok", [
    ("<think>\n推理\n</think>\n答案：A", True), ("  <think>x</think>答案：AB\n", True),
    ("推理\n答案：A", False), ("<think>\n推理\n答案：A", False), ("<think>x</think>\n没有答案", False),
    ("<think>x</think><think>y</think>答案：A", False),
])
def test_is_well_formed(text, ok):
    assert T.is_well_formed(text) == ok
