"""The benchmarks people quote, read from a few rows of each published layout built here:
MMLU (hendrycks CSV and cais/mmlu), C-Eval, CMMLU, GSM8K; and the CORE-style aggregate."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gptforge.errors import GptforgeError
from gptforge.eval.core import centred_accuracy, core_score
from gptforge.eval.generative import GenExample
from gptforge.eval.tasks import load_task

LETTERS = (" A", " B", " C", " D")
MMLU_HEADER = ("The following are multiple choice questions (with answers) about college "
               "physics.\n\n")
Q1 = ("What is c?", "light speed", "sound speed", "zero", "one", "A")
Q2 = ("Unit of force?", "joule", "newton", "watt", "volt", "B")
DEV = [("1 + 1?", "1", "2", "3", "4", "B"), ("2 * 3?", "5", "6", "7", "8", "B"),
       ("Sky colour?", "red", "green", "blue", "black", "C")]


def write_csv(path, rows, header=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(header)
        writer.writerows(rows)


def hendrycks(root, test=(Q1, Q2), dev=DEV):
    write_csv(root / "data" / "test" / "college_physics_test.csv", test)
    write_csv(root / "data" / "dev" / "college_physics_dev.csv", dev)
    return root


def test_mmlu_zero_shot_prompt_is_lm_evaluation_harness_s(tmp_path):
    task = load_task(str(hendrycks(tmp_path)), "mmlu")
    first, second = task.examples
    assert first.context == (MMLU_HEADER + "What is c?\nA. light speed\nB. sound speed\n"
                             "C. zero\nD. one\nAnswer:")
    assert first.choices == LETTERS and (first.label, second.label) == (0, 1)
    assert first.where == f"{tmp_path}/data/test/college_physics_test.csv:1"


def test_mmlu_few_shot_takes_the_first_dev_rows(tmp_path):
    (example, _) = load_task(str(hendrycks(tmp_path)), "mmlu", shots=2).examples
    shot = "{}\nA. {}\nB. {}\nC. {}\nD. {}\nAnswer: {}\n\n"
    assert example.context == (MMLU_HEADER + shot.format(*DEV[0]) + shot.format(*DEV[1]) +
                               "What is c?\nA. light speed\nB. sound speed\nC. zero\nD. one\n"
                               "Answer:")
    with pytest.raises(GptforgeError, match="3 example.*fewer than --shots 5"):
        load_task(str(tmp_path), "mmlu", shots=5)


def test_mmlu_cais_layouts_match_the_csv_layout(tmp_path):
    """The Hugging Face cais/mmlu layout (parquet per subject, or JSONL) gives the same
    examples as hendrycks' CSV files of the same rows."""
    expected = load_task(str(hendrycks(tmp_path / "csv")), "mmlu", shots=1).examples

    def records(rows):
        return [{"question": r[0], "subject": "college_physics", "choices": list(r[1:5]),
                 "answer": "ABCD".index(r[5])} for r in rows]

    folder = tmp_path / "cais" / "college_physics"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(records([Q1, Q2])),
                   folder / "test-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(records(DEV)), folder / "dev-00000-of-00001.parquet")
    from_parquet = load_task(str(tmp_path / "cais"), "mmlu", shots=1).examples
    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    for name, rows in (("test", [Q1, Q2]), ("dev", DEV)):
        (jsonl / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n"
                                                     for r in records(rows)))
    from_file = load_task(str(jsonl / "test.jsonl"), "mmlu", shots=1).examples
    strip = [(e.context, e.choices, e.label) for e in expected]
    assert [(e.context, e.choices, e.label) for e in from_parquet] == strip
    assert [(e.context, e.choices, e.label) for e in from_file] == strip


def test_ceval_layout_scores_the_val_split(tmp_path):
    header = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    layers = ["网络层", "传输层", "应用层", "链路层"]
    write_csv(tmp_path / "val" / "computer_network_val.csv",
              [["0", "TCP属于哪一层？", *layers, "B", "..."]], header)
    write_csv(tmp_path / "dev" / "computer_network_dev.csv",
              [["0", "IP属于哪一层？", *layers, "A", "因为"]], header)
    write_csv(tmp_path / "test" / "computer_network_test.csv",
              [["0", "UDP属于哪一层？", *layers, ""]], header[:7])
    (tmp_path / "subject_mapping.json").write_text(json.dumps(
        {"computer_network": ["Computer Network", "计算机网络", "STEM"]}, ensure_ascii=False))
    (example,) = load_task(str(tmp_path), "ceval", shots=1).examples
    assert example.context == (
        "以下是中国关于计算机网络的单项选择题，请选出其中的正确答案。\n\n"
        "IP属于哪一层？\nA. 网络层\nB. 传输层\nC. 应用层\nD. 链路层\n答案： A\n\n"
        "TCP属于哪一层？\nA. 网络层\nB. 传输层\nC. 应用层\nD. 链路层\n答案：")
    assert example.label == 1 and example.choices == LETTERS
    with pytest.raises(GptforgeError, match="test_.*csv:2: no answer .*--task-split val"):
        load_task(str(tmp_path), "ceval", split="test")
    # C-Eval's published test files have no answer column at all.
    write_csv(tmp_path / "test" / "computer_network_test.csv",
              [["0", "UDP属于哪一层？", *layers]], header[:6])
    with pytest.raises(GptforgeError, match="test_.*csv:1: no answer column"):
        load_task(str(tmp_path), "ceval", split="test")


def test_cmmlu_layout(tmp_path):
    header = ["", "Question", "A", "B", "C", "D", "Answer"]
    write_csv(tmp_path / "test" / "agronomy.csv",
              [["0", "水稻是什么？", "谷物", "水果", "蔬菜", "花", "A"],
               ["1", "小麦呢？", "花", "谷物", "水果", "蔬菜", "B"]], header)
    write_csv(tmp_path / "dev" / "agronomy.csv", [["0", "q", "a", "b", "c", "d", "D"]], header)
    examples = load_task(str(tmp_path), "cmmlu").examples
    assert [e.label for e in examples] == [0, 1]
    assert examples[0].context == ("以下是关于agronomy的单项选择题，请直接给出正确答案的选项。"
                                   "\n\n水稻是什么？\nA. 谷物\nB. 水果\nC. 蔬菜\nD. 花\n答案：")
    assert examples[1].where == f"{tmp_path}/test/agronomy.csv:3"


@pytest.mark.parametrize("fmt, rows, message", [
    ("mmlu", [("q", "a", "b", "c", "d")], r"college_physics_test.csv:1: 5 columns, expected 6"),
    ("mmlu", [("q", "a", "b", "c", "d", "E")], r"_test.csv:1: answer 'E' is not one of"),
])
def test_bad_exam_rows_name_file_and_line(tmp_path, fmt, rows, message):
    hendrycks(tmp_path, test=rows)
    with pytest.raises(GptforgeError, match=message):
        load_task(str(tmp_path), fmt)


def test_bad_exam_folders(tmp_path):
    header = ["", "Question", "A", "B", "C", "D", "Answer"]
    write_csv(tmp_path / "test" / "x.csv", [["q", "a", "b", "c", "d", "A"]], header[1:])
    with pytest.raises(GptforgeError, match=r"x.csv:1: the header .* expected ',Question"):
        load_task(str(tmp_path), "cmmlu")
    with pytest.raises(GptforgeError, match="no 'val' folder"):
        load_task(str(tmp_path), "ceval")
    with pytest.raises(GptforgeError, match="no dev file for subject 'x'|no 'dev' folder"):
        load_task(str(tmp_path), "mmlu", shots=1)
    with pytest.raises(GptforgeError, match="no such task file or folder"):
        load_task(str(tmp_path / "nope"), "mmlu")


def test_gsm8k_layout_and_shots_from_train_beside_it(tmp_path):
    rows = [{"question": "Tom has 3 apples and buys 2. How many?",
             "answer": "3 + 2 = <<3+2=5>>5\n#### 5"},
            {"question": "A pen costs $1,200. Two pens?", "answer": "2 * 1200 = 2400\n#### 2,400"}]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_task(str(tmp_path / "test.jsonl"), "gsm8k")
    assert task.generative and task.shots == []
    assert task.examples[0] == GenExample("Question: Tom has 3 apples and buys 2. How many?\n"
                                          "Answer:", (rows[0]["answer"],),
                                          f"{tmp_path}/test.jsonl:1")
    with pytest.raises(GptforgeError, match="train.jsonl beside it .* missing"):
        load_task(str(tmp_path / "test.jsonl"), "gsm8k", shots=1)
    (tmp_path / "train.jsonl").write_text(json.dumps(rows[1]) + "\n")
    (shot,) = load_task(str(tmp_path / "test.jsonl"), "gsm8k", shots=1).shots
    assert shot.prompt == "Question: A pen costs $1,200. Two pens?\nAnswer:"
    (tmp_path / "bad.jsonl").write_text('{"question": "q"}\n{"question": "q", "answer": "4"}\n')
    with pytest.raises(GptforgeError, match=r"bad.jsonl:1: no field 'answer'"):
        load_task(str(tmp_path / "bad.jsonl"), "gsm8k")


def test_generate_records_and_their_errors(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text('{"prompt": "Hi", "answer": ["hello", "hey"]}\n{"prompt": "2+2=", '
                    '"answer": "4"}\n')
    first, second = load_task(str(path), "generate").examples
    assert first.answers == ("hello", "hey") and second.answers == ("4",)
    path.write_text('{"prompt": "Hi", "answer": []}\n')
    with pytest.raises(GptforgeError, match=r"g.jsonl:1: 'answer' must be a string or"):
        load_task(str(path), "generate")
    path.write_text('{"prompt": "Hi", "answer": "hello"}\n')
    with pytest.raises(GptforgeError, match="--shots needs --fewshot-from"):
        load_task(str(path), "generate", shots=1)
    with pytest.raises(GptforgeError, match="--shots applies to"):
        load_task(str(path), "mc", shots=1)


def test_centred_accuracy_and_core_score():
    assert centred_accuracy(0.25, 0.25) == 0.0 and centred_accuracy(1.0, 0.5) == 1.0
    assert centred_accuracy(0.625, 0.25) == pytest.approx(0.5)
    core = core_score([("piqa", {"acc_norm": 0.75, "random_baseline": 0.5}),
                       ("mmlu", {"acc_norm": 0.25, "random_baseline": 0.25}),
                       ("gsm8k", {"exact_match": 0.1})])
    assert core["core"] == pytest.approx((0.5 + 0.0 + 0.1) / 3)
    assert [e["metric"] for e in core["tasks"]] == ["acc_norm", "acc_norm", "exact_match"]


def test_mmlu_from_an_hf_dataset_directory(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "mmlu"
    folder.mkdir()
    # (A local "dev.jsonl" would be read by `datasets` as the validation split; on the Hub,
    # cais/mmlu names its dev split "dev", which --shots reads.)
    (folder / "test.jsonl").write_text("".join(
        json.dumps({"question": r[0], "subject": "college_physics", "choices": list(r[1:5]),
                    "answer": "ABCD".index(r[5])}) + "\n" for r in (Q1, Q2)))
    expected = load_task(str(hendrycks(tmp_path / "csv")), "mmlu").examples
    examples = load_task(f"hf:{folder}@test", "mmlu").examples
    assert [(e.context, e.label) for e in examples] == [(e.context, e.label) for e in expected]
    assert examples[1].where == f"hf:{folder}@test row 1"


def test_the_cli_lists_every_task_format():
    from gptforge.commands import eval as eval_command
    from gptforge.eval.tasks import GEN_CONVERTERS, TASK_FORMATS

    assert eval_command.TASK_FORMATS == TASK_FORMATS
    assert eval_command.GENERATIVE_FORMATS == tuple(GEN_CONVERTERS)
