"""The field's benchmark suite: MedEvalKit's scorer (hand-computed cases, its quirks and the corrected values),
the Hugging Face / multiple-choice layouts built here as small fixtures from the shipped VQA-RAD images, each run
end to end through evaluate_vqa.main with the tiny bundle, the published-anchor table, and the LLM judge against a
local fake OpenAI-compatible server."""

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import evaluate_vqa
import medevalkit_metrics as mek
from benchmark_report import JudgeError, parse_judge, published_anchors
from evaluate_vqa import DatasetFormatError, EvaluationArguments
from modeling_visual_med_alpaca import DISCLAIMER
from vqa_datasets import load_mmmu, load_omnimedvqa, load_pmc_vqa, load_vqa_rad_parquet
from vqa_metrics import extract_choice

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGES = sorted((REPO_ROOT / "data" / "vqa_rad_dev" / "images").glob("*.jpg"))


# --------------------------------------------------------------------------------------------------
# MedEvalKit's scorer, hand-computed
# --------------------------------------------------------------------------------------------------


def test_calculate_f1_unpacking_swap_is_reproduced_and_corrected():
    # Token sets {"the", "left", "lung."} vs {"left", "lung"}: precision 1/3, recall 1/2, F1 0.4.
    assert mek.calculate_f1("the left lung.", "left lung") == pytest.approx((0.4, 1 / 3, 1 / 2))
    metrics = mek.judge_open_end_vqa("left lung", "The left lung.")
    assert (metrics["precision"], metrics["recall"], metrics["f1"]) == pytest.approx((0.4, 1 / 3, 1 / 2))
    assert (metrics["token_precision"], metrics["token_recall"], metrics["token_f1"]) == pytest.approx(
        (1 / 3, 1 / 2, 0.4)
    )
    assert metrics["em"] is False and metrics["harness_error"] is None
    assert mek.calculate_f1("", "x") == 0  # a bare 0: the harness's unpacking would fail


def test_bleu_and_rouge_come_from_the_harness_packages():
    assert mek.bleu("left lung", "left lung", 1) == 1.0
    assert mek.bleu("left lung", "left lung", 2) == 1.0
    # nltk 3.9.1 without smoothing: no 3-grams in a 2-word answer gives a vanishing score, not 1.
    assert mek.bleu("left lung", "left lung", 3) < 1e-100
    assert mek.tokenize("Left lung.") == ["left", "lung", "."]
    assert mek.rouge_f("Left Lung", "left lung")["rougel"] == pytest.approx(1.0, abs=1e-6)
    assert mek.rouge_f("left", "left lung")["rouge1"] == pytest.approx(2 / 3, abs=1e-6)


@pytest.mark.parametrize("response", ["", "...", "answer:", "a " * 1200])
def test_answers_that_abort_the_harness_are_scored_wrong_not_crashed(response):
    metrics = mek.judge_open_end_vqa("left lung", response)
    assert metrics["harness_error"] and metrics["em"] is False
    assert metrics["rouge1"] == metrics["rougel"] == 0.0


@pytest.mark.parametrize(
    ("answer", "response", "expected"),
    [
        ("no", "abnormal", True),  # substring: "no" inside "abnormal", and no "yes"
        ("yes", "eyes look fine", True),  # "yes" inside "eyes"
        ("yes", "yes, no doubt", False),  # both substrings: no verdict
        ("no", "Answer: No.", True),
        ("yes", "\\boxed{yes}", True),
        ("no", "", False),
    ],
)
def test_yes_no_judgement_is_a_substring_test(answer, response, expected):
    assert mek.judge_judgement(answer, response) is expected


def test_closed_by_answer_text_vs_slake_answer_type():
    # VQA_RAD.py: the answer text decides; "Yes" is lower-cased and judged by the yes/no rule.
    assert mek.score_vqa_question("Yes, it is.", "Yes", "OPEN", "vqa_rad") == {
        "group": "close",
        "rule": "judge_judgement",
        "correct": True,
    }
    # SLAKE.py: answer_type decides, and a capitalised "Yes" goes to the exact-match rule.
    slake = mek.score_vqa_question("Yes, it is.", "Yes", "CLOSED", "slake")
    assert slake == {"group": "close", "rule": "judge_close_end_vqa", "correct": False}
    assert mek.score_vqa_question("yes", "Yes", "CLOSED", "slake")["correct"] is True
    assert mek.score_vqa_question("liver", "Liver", "OPEN", "slake")["group"] == "open"


def test_cal_metrics_open_acc_is_divided_twice_and_empty_groups_do_not_crash():
    verdicts = [
        mek.score_vqa_question("left lung", "left lung", "OPEN", "vqa_rad"),
        mek.score_vqa_question("liver", "left lung", "OPEN", "vqa_rad"),
        mek.score_vqa_question("", "spleen", "OPEN", "vqa_rad"),
        mek.score_vqa_question("no", "no", "CLOSED", "vqa_rad"),
    ]
    report = mek.aggregate_vqa(verdicts)
    assert report["open"]["accuracy"] == pytest.approx(1 / 3)
    assert report["open"]["acc_as_printed"] == pytest.approx(1 / 3 / 3)
    assert report["overall_accuracy"] == 0.5 and report["close"]["accuracy"] == 1.0
    assert report["n_harness_would_abort"] == 1 and report["harness_divides_by_zero"] is False
    only_closed = mek.aggregate_vqa([verdicts[-1]])
    assert only_closed["open"]["accuracy"] is None and only_closed["open"]["acc_as_printed"] is None
    assert only_closed["harness_divides_by_zero"] is True


def test_wilson_interval():
    assert mek.wilson_interval(0, 0) is None
    assert mek.wilson_interval(5, 10) == pytest.approx([0.2366, 0.7634], abs=1e-4)
    low, high = mek.wilson_interval(0, 20)
    assert low == 0.0 and 0.15 < high < 0.17
    assert mek.wilson_interval(20, 20)[1] == 1.0


def test_judge_multi_choice_and_its_never_unparsed_quirk():
    choices = ["A:CT", "B:MRI", "C:X-ray", "D:Ultrasound"]
    assert mek.judge_multi_choice(choices, "C", "The answer is C.")
    assert mek.judge_multi_choice(choices, "B", "B")
    assert not mek.judge_multi_choice(choices, "B", "A")
    # An empty response is matched to the most similar option (none: option A) and counts as right.
    assert mek.judge_multi_choice(choices, "A", "")
    assert extract_choice("", "ABCD") is None  # the corrected scorer: no answer, wrong


def test_mmmu_parsing_random_pick_is_seeded_and_open_answers_never_match():
    options = {"A": "aspirin", "B": "heparin", "C": "warfarin"}
    assert mek.mmmu_parse_multi_choice_response("(B)", list(options), options, "q1") == ("B", True)
    assert mek.mmmu_parse_multi_choice_response("I think it is heparin here ok", list(options), options, "q") == (
        "B",
        True,
    )
    unparsed = mek.mmmu_parse_multi_choice_response("no idea", list(options), options, "q7")
    assert unparsed[1] is False and unparsed == mek.mmmu_parse_multi_choice_response("?", list(options), options, "q7")
    # eval_open over the raw response string iterates its characters: "24" never matches 24.
    assert mek.mmmu_eval_open("24", "24") is False
    assert mek.mmmu_eval_open(mek.mmmu_gold("24"), mek.mmmu_corrected_open_predictions("it is 24")) is True


def test_response_unwrapping():
    assert mek.extract_boxed_content("so \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert mek.extract_boxed_content("no box") == "None"
    assert mek.extract_tag("<answer>liver</answer>", "answer") == "liver"
    assert mek.cal_metrics_response("<think>x</think><answer>spleen</answer>") == "spleen"
    assert mek.parse_response("The final answer is Liver") == " liver"


def test_judge_prompt_and_verdict():
    prompt = mek.judge_prompt("Which organ?", "liver", "the liver")
    assert "The question is: Which organ?\n\nThe standard answer: the liver\n\nThe user's answer: liver" in prompt
    assert "<judge>{0/1}</judge>" in prompt
    assert mek.judge_verdict("<think>same</think>\n<judge>0</judge>") is True
    assert mek.judge_verdict("<judge>1</judge>") is False and mek.judge_verdict(None) is False


def test_published_anchors_are_theirs_and_complete():
    rows = published_anchors("vqa_rad")
    models = {row["model"] for row in rows}
    assert {"LLaVA-Med-7B", "MedGemma-4B-IT", "HuatuoGPT-V-7B", "Lingshu-7B"} <= models
    assert all(row["scorer"] == "medevalkit" and "MedEvalKit" in row["source"] for row in rows)
    lingshu = {row["dataset"]: row["number"] for row in published_anchors("slake") if row["model"] == "Lingshu-7B"}
    assert lingshu == {"slake": 83.1}
    for dataset in ("slake", "pathvqa", "pmc_vqa", "omnimedvqa", "mmmu_med"):
        assert len(published_anchors(dataset)) == 7


# --------------------------------------------------------------------------------------------------
# Fixtures in the published layouts (real radiology images)
# --------------------------------------------------------------------------------------------------


def _jpeg(index: int) -> bytes:
    return IMAGES[index].read_bytes()


def _image_struct(index: int) -> dict:
    return {"bytes": _jpeg(index), "path": f"synpic{index}.jpg"}


def build_vqa_rad_parquet(root: Path) -> Path:
    rows = [("is there a fracture?", "no"), ("which organ is shown?", "brain"), ("is this an mri?", "yes")]
    table = pa.table(
        {
            "image": [_image_struct(i) for i in range(len(rows))],
            "question": [q for q, _ in rows],
            "answer": [a for _, a in rows],
        }
    )
    (root / "data").mkdir(parents=True)
    pq.write_table(table, root / "data" / "test-00000-of-00001.parquet")
    return root


def build_pmc_vqa(root: Path, name: str = "test_clean.csv") -> Path:
    (root / "figures").mkdir(parents=True)
    for i in range(3):
        (root / "figures" / f"PMC{i}_F1.jpg").write_bytes(_jpeg(i))
    rows = [
        ("PMC0_F1.jpg", "What modality is shown?", "CT", " A:CT ", " B:MRI ", " C:X-ray ", " D:Ultrasound ", "A"),
        ("PMC1_F1.jpg", '"Which plane, axial or other?"', "Sagittal", " A:Axial ", " B:Sagittal ", " C:Coronal ",
         " D:Oblique ", "B"),
        ("PMC2_F1.jpg", "Which organ is shown?", "Brain", " A:Liver ", " B:Lung ", " C:Kidney ", " D:Brain ", "D"),
    ]  # fmt: skip
    if name == "test_clean.csv":
        lines = ["Figure_path,Question,Answer,Choice A,Choice B,Choice C,Choice D,Answer_label"]
        lines += [",".join(row) for row in rows]
    else:  # MedEvalKit's test_2.csv: index and Caption before, the letter in Answer, split after
        lines = ["index,Figure_path,Caption,Question,Choice A,Choice B,Choice C,Choice D,Answer,split"]
        lines += [",".join([str(i), f, "a caption", q, a, b, c, d, letter, "test"])
                  for i, (f, q, _, a, b, c, d, letter) in enumerate(rows)]  # fmt: skip
    (root / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def build_omnimedvqa(root: Path) -> Path:
    folder = root / "QA_information" / "Open-access"
    folder.mkdir(parents=True)
    (root / "Images" / "RadSet").mkdir(parents=True)
    records = []
    for i, (question, options, answer, modality) in enumerate(
        [
            ("What imaging modality is this?", ["CT", "MR", "X-Ray", "PET"], "MR", "MR (Mag-netic Resonance Imaging)"),
            ("Which organ is shown?", ["Brain", "Heart", "Liver"], "Brain", "MR (Mag-netic Resonance Imaging)"),
            ("Is there an abnormality?", ["Yes", "No"], "No", "CT(Computed Tomography)"),
        ]
    ):
        (root / "Images" / "RadSet" / f"{i}.jpg").write_bytes(_jpeg(i))
        record = {
            "dataset": "RadSet",
            "question_id": f"RadSet_{i:04d}",
            "question_type": "Modality Recognition" if i == 0 else "Anatomy Identification",
            "question": question,
            "gt_answer": answer,
            "image_path": f"Images/RadSet/{i}.jpg",
            "modality_type": modality,
        }
        record.update({f"option_{letter}": text for letter, text in zip("ABCD", options, strict=False)})
        records.append(record)
    (folder / "RadSet.json").write_text(json.dumps(records), encoding="utf-8")
    return root


def build_mmmu(root: Path, split: str = "validation", answers=("B", "A", "12")) -> Path:
    folder = root / "Clinical_Medicine"
    folder.mkdir(parents=True)
    rows = {
        "id": [f"{split}_Clinical_Medicine_{i}" for i in (1, 2, 3)],
        "question": ["<image 1> Which lobe?", "Compare <image 1> and <image 2>.", "How many ribs in <image 1>?"],
        "options": ["['Upper', 'Lower', 'Middle']", "['Same', 'Different']", "[]"],
        "explanation": ["", "", ""],
        "answer": list(answers),
        "question_type": ["multiple-choice", "multiple-choice", "open"],
        "image_1": [_image_struct(0), _image_struct(1), _image_struct(2)],
        "image_2": [None, _image_struct(3), None],
        "img_type": ["['CT']", "['CT']", "['X-ray']"],
        "subfield": ["Radiology"] * 3,
        "topic_difficulty": ["Easy"] * 3,
    }
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = {
        name: pa.array(values, type=image_type) if name.startswith("image_") else pa.array(values)
        for name, values in rows.items()
    }
    for k in range(3, 8):
        schema[f"image_{k}"] = pa.array([None] * 3, type=image_type)
    pq.write_table(pa.table(schema), folder / f"{split}-00000-of-00001.parquet")
    return root


# --------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------


def test_vqa_rad_parquet_layout(tmp_path):
    examples = load_vqa_rad_parquet(build_vqa_rad_parquet(tmp_path), "test")
    assert [(e.qid, e.answer, e.answer_type) for e in examples] == [
        ("0", "no", "CLOSED"),
        ("1", "brain", "OPEN"),
        ("2", "yes", "CLOSED"),
    ]
    assert examples[1].image_source() == _jpeg(1)
    with pytest.raises(DatasetFormatError, match="split 'train'"):
        load_vqa_rad_parquet(tmp_path, "train")
    pq.write_table(pa.table({"question": ["q"]}), tmp_path / "bad.parquet")
    with pytest.raises(DatasetFormatError, match="lacks column"):
        load_vqa_rad_parquet(tmp_path / "bad.parquet")


@pytest.mark.parametrize("name", ["test_clean.csv", "test_2.csv"])
def test_pmc_vqa_layouts(tmp_path, name):
    root = build_pmc_vqa(tmp_path, name)
    examples = load_pmc_vqa(root / name)
    assert [e.answer for e in examples] == ["A", "B", "D"]
    assert examples[0].options == {"A": "CT", "B": "MRI", "C": "X-ray", "D": "Ultrasound"}
    assert examples[0].extra["harness_choices"][0] == " A:CT "
    assert examples[1].question == "Which plane, axial or other?"
    assert Path(examples[2].image).read_bytes() == _jpeg(2)


def test_pmc_vqa_wrong_layout(tmp_path):
    (tmp_path / "test_clean.csv").write_text("Figure_path,Question,Answer\nx.jpg,q,a\n")
    with pytest.raises(DatasetFormatError, match="Choice A"):
        load_pmc_vqa(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetFormatError, match="test_clean.csv or test_2.csv"):
        load_pmc_vqa(tmp_path / "empty")
    with pytest.raises(DatasetFormatError, match="not found"):
        load_pmc_vqa(tmp_path / "missing.csv")


def test_omnimedvqa_layout(tmp_path):
    examples = load_omnimedvqa(build_omnimedvqa(tmp_path))
    assert [e.answer for e in examples] == ["B", "A", "B"]
    assert examples[2].options == {"A": "Yes", "B": "No"}
    assert examples[0].extra["harness_choices"] == ["A. CT", "B. MR", "C. X-Ray", "D. PET"]
    assert examples[0].extra["modality"].startswith("MR")
    with pytest.raises(DatasetFormatError, match="Open-access"):
        load_omnimedvqa(tmp_path / "Images")
    broken = tmp_path / "broken"
    (broken / "QA_information" / "Open-access").mkdir(parents=True)
    (broken / "QA_information" / "Open-access" / "X.json").write_text('[{"question": "q", "image_path": "i.jpg"}]')
    with pytest.raises(DatasetFormatError, match="lacks gt_answer"):
        load_omnimedvqa(broken)


def test_mmmu_layout_and_image_policy(tmp_path):
    examples = load_mmmu(build_mmmu(tmp_path), "validation")
    assert [e.question_type for e in examples] == ["multiple-choice", "multiple-choice", "open"]
    assert examples[0].options == {"A": "Upper", "B": "Lower", "C": "Middle"} and examples[2].options is None
    assert [e.extra["n_images"] for e in examples] == [1, 2, 1]
    assert examples[1].image_source() == _jpeg(1)  # image_1 only, as MedEvalKit's process_single_sample
    assert examples[0].extra["subject"] == "Clinical_Medicine"
    hidden = build_mmmu(tmp_path / "hidden", "test", answers=("?", "?", "?"))
    with pytest.raises(DatasetFormatError, match="--split validation"):
        load_mmmu(hidden, "test")
    with pytest.raises(DatasetFormatError, match="No MMMU parquet"):
        load_mmmu(tmp_path, "dev")
    table = pq.read_table(tmp_path / "Clinical_Medicine" / "validation-00000-of-00001.parquet")
    bad = tmp_path / "bad" / "Clinical_Medicine"
    bad.mkdir(parents=True)
    options = pa.array(["not a list", "['a']", "[]"])
    pq.write_table(
        table.set_column(table.column_names.index("options"), "options", options), bad / "validation-0.parquet"
    )
    with pytest.raises(DatasetFormatError, match="not a list literal"):
        load_mmmu(tmp_path / "bad", "validation")


# --------------------------------------------------------------------------------------------------
# End to end with the tiny bundle
# --------------------------------------------------------------------------------------------------


def _run(bundle_dir, output_dir, dataset, data_path, **overrides):
    values = {
        "model": str(bundle_dir),
        "dataset": dataset,
        "data_path": str(data_path),
        "output_dir": str(output_dir),
        "batch_size": 3,
        "max_new_tokens": 4,
    }
    values.update(overrides)
    return evaluate_vqa.main(EvaluationArguments(**values))


def _records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "predictions.jsonl").read_text().splitlines()]


def _check_common(report: dict, output_dir: Path, data_file: Path | None):
    run = report["run"]
    assert run["generation"]["max_new_tokens"] == 4 and run["generation"]["do_sample"] is False
    assert run["data_sha256"] is not None and run["data_files"]
    if data_file is not None:
        assert str(data_file) in run["data_files"]
    assert run["bundle"]["local_folder_sha256"]
    assert "Wilson" in run["confidence_intervals"]
    anchors = report["published_anchors"]
    assert anchors["label"].startswith("published by others") and len(anchors["rows"]) == 7
    markdown = (output_dir / "report.md").read_text()
    assert "## What ran" in markdown and "theirs (published)" in markdown and "**this run**" in markdown
    with Image.open(output_dir / "report.png") as chart:
        assert chart.format == "PNG"
    assert report == json.loads((output_dir / "report.json").read_text())


def test_vqa_rad_parquet_end_to_end(bundle_dir, tmp_path):
    root = build_vqa_rad_parquet(tmp_path / "vqa-rad")
    report = _run(bundle_dir, tmp_path / "out", "vqa_rad", root)
    records = _records(tmp_path / "out")
    assert [r["qid"] for r in records] == ["0", "1", "2"]
    for record in records:
        assert record["disclaimer"] == DISCLAIMER and record["expert"] == "radiology"
        expected = mek.score_vqa_question(record["prediction"], record["answer"], record["answer_type"], "vqa_rad")
        assert record["medevalkit"] == expected
        assert {"llava_med_closed_accuracy", "strict_closed_accuracy"} <= set(record["scores"]) or record[
            "answer_type"
        ] == "OPEN"
    assert report["medevalkit"] == mek.aggregate_vqa(r["medevalkit"] for r in records)
    assert report["run"]["subset"] == {"split": "test"} and report["run"]["n_questions_in_subset"] == 3
    data_file = root / "data" / "test-00000-of-00001.parquet"
    digest = hashlib.sha256(json.dumps(data_file.name).encode() + data_file.read_bytes()).hexdigest()
    assert report["run"]["data_sha256"] == digest
    _check_common(report, tmp_path / "out", data_file)
    assert "## MedEvalKit scorer" in (tmp_path / "out" / "report.md").read_text()


def test_shipped_vqa_rad_dev_end_to_end_with_medevalkit_and_limit_message(bundle_dir, tmp_path, capsys):
    data = REPO_ROOT / "data" / "vqa_rad_dev" / "questions.json"
    report = _run(bundle_dir, tmp_path / "out", "vqa_rad", data, limit=4)
    assert report["run"]["limit"] == 4 and report["run"]["n_questions_in_subset"] == 440
    records = _records(tmp_path / "out")
    assert report["medevalkit"]["n"] == 4 == len(records)
    for metric, interval in report["accuracy_ci95"].items():
        assert interval is None or 0.0 <= interval[0] <= interval[1] <= 1.0, metric
    _check_common(report, tmp_path / "out", data)
    capsys.readouterr()
    smaller = _run(bundle_dir, tmp_path / "out", "vqa_rad", data, limit=2)
    printed = capsys.readouterr().out
    assert "2 of 2 already predicted; 0 to go" in printed
    assert "2 more prediction(s) for questions outside this run" in printed
    assert smaller["n"] == 2


def test_slake_end_to_end_uses_slake_rules(bundle_dir, tmp_path):
    root = tmp_path / "Slake1.0"
    (root / "imgs" / "xmlab0").mkdir(parents=True)
    (root / "imgs" / "xmlab0" / "source.jpg").write_bytes(_jpeg(0))
    records = [
        {"qid": 1, "img_name": "xmlab0/source.jpg", "question": "Is this a CT?", "answer": "Yes",
         "answer_type": "CLOSED", "q_lang": "en", "content_type": "Modality", "location": "Brain"},
        {"qid": 2, "img_name": "xmlab0/source.jpg", "question": "Which organ?", "answer": "Brain",
         "answer_type": "OPEN", "q_lang": "en", "content_type": "Organ", "location": "Brain"},
    ]  # fmt: skip
    (root / "test.json").write_text(json.dumps(records))
    report = _run(bundle_dir, tmp_path / "out", "slake", root)
    first = _records(tmp_path / "out")[0]
    assert first["medevalkit"]["rule"] == "judge_close_end_vqa"  # capitalised "Yes": SLAKE.py's exact match
    assert report["run"]["subset"] == {"language": "en"}
    _check_common(report, tmp_path / "out", root / "test.json")


@pytest.mark.parametrize("dataset", ["pmc_vqa", "omnimedvqa", "mmmu_med"])
def test_image_multiple_choice_end_to_end(bundle_dir, tmp_path, dataset):
    builders = {"pmc_vqa": build_pmc_vqa, "omnimedvqa": build_omnimedvqa, "mmmu_med": build_mmmu}
    root = builders[dataset](tmp_path / dataset)
    split = {"split": "validation"} if dataset == "mmmu_med" else {}
    report = _run(bundle_dir, tmp_path / "out", dataset, root, **split)
    records = _records(tmp_path / "out")
    examples = evaluate_vqa.load_examples(EvaluationArguments(model="x", dataset=dataset, data_path=str(root), **split))
    assert [r["qid"] for r in records] == [e.qid for e in examples]
    for record, example in zip(records, examples, strict=True):
        assert record["disclaimer"] == DISCLAIMER and record["expert"] == "radiology"  # the image reached the pipeline
        assert record["medevalkit"]["correct"] in (True, False)
        if example.options:
            assert record["choice"] == extract_choice(record["prediction"], example.options, example.options)
            assert record["correct"] == (record["choice"] == example.answer)
    overall = report["medevalkit"]["overall"]
    right = sum(r["medevalkit"]["correct"] for r in records)
    assert overall["accuracy"] == right / len(records)
    assert overall["accuracy_ci95"] == mek.wilson_interval(right, len(records))
    if dataset == "omnimedvqa":
        assert set(report["medevalkit"]["by_modality"]) == {e.extra["modality"] for e in examples}
    if dataset == "mmmu_med":
        assert report["n_multi_image"] == 1 and set(report["medevalkit"]["by_subject"]) == {"Clinical_Medicine"}
    _check_common(report, tmp_path / "out", None)


def test_image_multiple_choice_resumes(bundle_dir, tmp_path, capsys):
    root = build_pmc_vqa(tmp_path / "pmc")
    first = _run(bundle_dir, tmp_path / "out", "pmc_vqa", root, limit=2)
    before = _records(tmp_path / "out")
    capsys.readouterr()
    full = _run(bundle_dir, tmp_path / "out", "pmc_vqa", root)
    assert "2 of 3 already predicted; 1 to go" in capsys.readouterr().out
    after = _records(tmp_path / "out")
    assert [r["prediction"] for r in after[:2]] == [r["prediction"] for r in before]
    assert first["n"] == 2 and full["n"] == 3 and full["run"]["limit"] is None


def test_mcq_options_fill_the_question_slot_of_the_unchanged_template():
    from modeling_visual_med_alpaca import build_inference_prompt

    example = evaluate_vqa.Example(qid="1", question="Which organ?", answer="A", options={"A": "Brain", "B": "Lung"})
    text = evaluate_vqa.mcq_prompt(example)
    assert text == f"Which organ?\n\nA. Brain\nB. Lung\n\n{evaluate_vqa.MCQ_INSTRUCTION}"
    prompt = build_inference_prompt(text, "a caption")
    assert prompt.count("### Instruction:") == 1 and "### Instruction:\nWhich organ?\n\nA. Brain\nB. Lung" in prompt


# --------------------------------------------------------------------------------------------------
# LLM judge (a local fake OpenAI-compatible server)
# --------------------------------------------------------------------------------------------------


class _FakeJudge(BaseHTTPRequestHandler):
    prompts: list[str] = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        type(self).prompts.append(prompt)
        verdict = "0" if any(f"The standard answer: {a}\n" in prompt for a in ("brain", "yes")) else "1"
        reply = {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": f"<think>ok</think>\n<judge>{verdict}</judge>"}}
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }  # fmt: skip
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_judge():
    _FakeJudge.prompts = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_llm_judge_scores_open_answers_with_medevalkits_prompt(bundle_dir, tmp_path, fake_judge):
    root = build_vqa_rad_parquet(tmp_path / "vqa-rad")
    judge = json.dumps({"type": "openai", "base_url": fake_judge, "model": "judge-llm", "api": "chat"})
    report = _run(bundle_dir, tmp_path / "out", "vqa_rad", root, judge_backend=judge)
    # One open question (answer "brain"): the fake judge says correct for it.
    assert len(_FakeJudge.prompts) == 1 and "The standard answer: brain" in _FakeJudge.prompts[0]
    section = report["llm_judge"]
    assert section["n_judged"] == 1 and section["open_accuracy"] == 1.0 and section["n_failed_calls"] == 0
    closed_right = report["medevalkit"]["close"]["right"]
    assert (
        section["overall_accuracy"] == section["overall_accuracy_as_printed"] == pytest.approx((closed_right + 1) / 3)
    )
    assert "## LLM judge" in (tmp_path / "out" / "report.md").read_text()


def test_llm_judge_reproduces_each_data_sets_printed_number(fake_judge):
    from benchmark_report import apply_llm_judge
    from language_backends import parse_backend

    config = parse_backend({"type": "openai", "base_url": fake_judge, "model": "judge-llm", "api": "chat"})

    def records():  # one closed right by rule, one open the fake judge accepts ("brain"), one it rejects
        rows = [("yes", "yes", "CLOSED"), ("brain", "a brain", "OPEN"), ("liver", "kidney", "OPEN")]
        return [
            {"question": "q", "prediction": p, "answer": a, "medevalkit": mek.score_vqa_question(p, a, t, "slake")}
            for a, p, t in rows
        ]

    assert apply_llm_judge(records(), config, "vqa_rad")["overall_accuracy_as_printed"] == pytest.approx(2 / 3)
    # PATH_VQA.py resets the closed count: only the judged open answer counts.
    assert apply_llm_judge(records(), config, "pathvqa")["overall_accuracy_as_printed"] == pytest.approx(1 / 3)
    # SLAKE.py judges every question and adds the judged-right closed "yes" on top of the rule's: counted twice.
    slake = apply_llm_judge(records(), config, "slake")
    assert slake["n_judged"] == 3 and slake["overall_accuracy_as_printed"] == pytest.approx(3 / 3)
    assert slake["overall_accuracy"] == pytest.approx(2 / 3)


def test_the_judge_is_never_the_model_under_test(bundle_dir, tmp_path):
    same = {"type": "openai", "base_url": "http://127.0.0.1:9/v1", "model": Path(bundle_dir).name}
    with pytest.raises(JudgeError, match="must not be the model under test"):
        parse_judge(json.dumps(same), str(bundle_dir))
    with pytest.raises(JudgeError, match="JSON"):
        parse_judge("{not json", str(bundle_dir))
    with pytest.raises(JudgeError, match="base_url"):
        parse_judge('{"type": "openai", "base_url": "ftp://x", "model": "m"}', str(bundle_dir))
    # Through main: refused before any prediction is made.
    root = build_vqa_rad_parquet(tmp_path / "vqa-rad")
    with pytest.raises(JudgeError):
        _run(bundle_dir, tmp_path / "out", "vqa_rad", root, judge_backend=json.dumps(same))
    assert not (tmp_path / "out" / "predictions").exists()
