"""The evaluation harness: metrics against hand-computed cases (LLaVA-Med's quirks included), dataset
loaders, an end-to-end run over real VQA-RAD images, resume after a kill, and a 2-process run."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

import evaluate_vqa
from evaluate_vqa import (
    DatasetFormatError,
    EvaluationArguments,
    Example,
    ResumeMismatchError,
    load_jsonl,
    load_medqa,
    load_pathvqa,
    load_roco,
    load_slake,
    load_vqa_rad,
    read_predictions,
    score_vqa,
)
from modeling_visual_med_alpaca import DISCLAIMER
from vqa_metrics import (
    aggregate,
    breakdown,
    exact_match,
    extract_choice,
    llava_med_closed_hit,
    llava_med_normalize,
    llava_med_precision_recall_f1,
    llava_med_recall,
    score_question,
    strict_closed_hit,
    token_f1,
    token_recall,
    yes_no_verdict,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
VQA_RAD = REPO_ROOT / "data" / "vqa_rad_dev"
SUBSET = 8  # questions of the end-to-end, 2-process and resume runs: small to stay fast


# --------------------------------------------------------------------------------------------------
# Metrics, hand-computed
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("The left kidney", "left kidney"),  # lower-cased, article dropped
        ("None", "0"),  # LLaVA-Med's number map turns "none" into "0"
        ("yes/no", "yes no"),  # punctuation not touching a space becomes a space
        ("yes / no", "yes no"),  # ... and is deleted when it touches one
        ("Left-sided, 1,000.", "leftsided 1000"),  # a digit-comma-digit anywhere deletes all punctuation
        ("What's up: 3.5 cm.", "what's up: 3.5 cm"),  # ':' and "'" are not in its list; 3.5 keeps its period
        ("dont know", "don't know"),  # VQA contractions restored
    ],
)
def test_llava_med_normalisation(text, normalised):
    assert llava_med_normalize(text) == normalised


def test_llava_med_removes_at_most_32_periods():
    # glossary.py passes re.UNICODE (= 32) where re.sub's count goes.
    assert llava_med_normalize(" ".join(["x."] * 40)).count(".") == 40 - 32


@pytest.mark.parametrize(
    ("prediction", "answer", "llava_med", "strict"),
    [
        ("No, it is not.", "no", 1.0, 1.0),
        ("There is no effusion", "no", 1.0, 1.0),  # the only yes/no word is the verdict
        ("abnormal", "no", 1.0, 0.0),  # substring quirk: "no" inside "abnormal"
        ("Yes, there is no effusion", "no", 1.0, 0.0),  # both words: LLaVA-Med counts it, the first word says yes
        ("maybe yes, maybe no", "yes", 1.0, 0.0),  # no committed verdict
        ("yes", "no", 0.0, 0.0),
        ("MRI", "mri", 1.0, 1.0),  # non-yes/no closed answer
        ("It is an MRI scan", "mri", 1.0, 0.0),  # strict: exact match for non-yes/no closed answers
        ("", "yes", 0.0, 0.0),
    ],
)
def test_closed_rules_side_by_side(prediction, answer, llava_med, strict):
    assert llava_med_closed_hit(prediction, answer) == llava_med
    assert strict_closed_hit(prediction, answer) == strict


def test_yes_no_verdict():
    assert yes_no_verdict("Yes. No doubt.") == "yes"
    assert yes_no_verdict("The answer is no") == "no"
    assert yes_no_verdict("cannot tell") is None
    assert yes_no_verdict("it is not normal") is None  # whole words only


def test_llava_med_recall_is_inflated_by_repeated_tokens():
    # tp counts "left" 3 times (its count in the prediction), fn = 1 ("lung"): 3 / (3 + 1).
    precision, recall, f1 = llava_med_precision_recall_f1("left left left", "left lung")
    assert (precision, recall) == (1.0, 0.75)
    assert f1 == pytest.approx(2 * 1.0 * 0.75 / 1.75)
    assert token_recall("left left left", "left lung") == 0.5  # clipped: one "left" of two reference tokens
    # Without repetition the two agree.
    assert llava_med_recall("left kidney", "the left lung") == token_recall("left kidney", "the left lung") == 0.5


def test_llava_med_recall_edge_cases():
    assert llava_med_recall("", "left lung") == 0.0
    assert llava_med_recall("liver", "left lung") == 0.0
    assert llava_med_recall("The Left Lung.", "left lung") == 1.0  # normalisation, applied twice as run_eval does
    # Recall ignores extra predicted words entirely.
    assert llava_med_recall("left lung liver spleen kidney", "left lung") == 1.0


def test_token_f1_and_exact_match():
    assert token_f1("left upper lobe", "right upper lobe") == pytest.approx(2 / 3)
    assert token_f1("upper upper upper", "upper lobe") == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert token_f1("", "") == 1.0 and token_f1("", "x") == 0.0
    assert exact_match("The aorta.", "aorta") == 1.0
    assert exact_match("aorta, abdominal", "aorta") == 0.0


def test_score_question_keys_by_answer_type():
    closed = score_question("no", "no", "CLOSED")
    assert set(closed) == {"exact_match", "token_f1", "llava_med_closed_accuracy", "strict_closed_accuracy"}
    assert all(value == 1.0 for value in closed.values())
    open_ = score_question("left left", "left lung", "OPEN")
    assert open_["llava_med_open_recall"] == pytest.approx(2 / 3)  # tp = 2, fn = 1
    assert open_["token_recall"] == 0.5
    assert open_["llava_med_open_substring_hit"] == 0.0


def test_aggregate_and_breakdowns_hand_computed():
    def record(prediction, answer, answer_type, question_type, organ):
        scores = score_question(prediction, answer, answer_type)
        return {"answer_type": answer_type, "question_type": question_type, "organ": organ, "scores": scores}

    records = [
        record("no", "no", "CLOSED", "PRES", "CHEST"),
        record("abnormal", "no", "CLOSED", "ABN, POS", "CHEST"),
        record("left left left", "left lung", "OPEN", "POS", "HEAD"),
        record("brain", "brain", "OPEN", None, "HEAD"),
    ]
    summary = aggregate(records)
    assert (summary["n"], summary["n_closed"], summary["n_open"]) == (4, 2, 2)
    assert summary["closed"]["llava_med_closed_accuracy"] == 1.0  # "abnormal" counts under LLaVA-Med's rule
    assert summary["closed"]["strict_closed_accuracy"] == 0.5
    assert summary["open"]["llava_med_open_recall"] == pytest.approx((0.75 + 1.0) / 2)
    assert summary["open"]["token_recall"] == pytest.approx((0.5 + 1.0) / 2)
    assert summary["overall"]["exact_match"] == 0.5
    by_type = breakdown(records, "question_type")
    assert set(by_type) == {"ABN", "POS", "PRES"}  # "ABN, POS" counts in both; unlabelled in none
    assert by_type["POS"]["n"] == 2 and by_type["POS"]["n_open"] == 1
    assert by_type["ABN"]["closed"]["strict_closed_accuracy"] == 0.0
    assert by_type["PRES"]["open"]["token_recall"] is None  # no open question of that type
    assert breakdown(records, "organ")["HEAD"]["open"]["exact_match"] == 0.5


@pytest.mark.parametrize(
    ("prediction", "choice"),
    [
        ("B", "B"),
        ("(C) Aspirin", "C"),
        ("D. Heparin, because ...", "D"),
        ("The answer is D.", "D"),
        ("answer: a", "A"),
        ("I would pick C here", "C"),
        ("Aspirin is best", "A"),  # option text, when exactly one option appears
        ("Not sure", None),
        ("A or B", None),
    ],
)
def test_extract_choice(prediction, choice):
    options = {"A": "Aspirin", "B": "Warfarin", "C": "Clopidogrel", "D": "Heparin"}
    assert extract_choice(prediction, options, options) == choice


# --------------------------------------------------------------------------------------------------
# Dataset loaders
# --------------------------------------------------------------------------------------------------


def test_vqa_rad_loader_reads_the_shipped_dev_set():
    examples = load_vqa_rad(VQA_RAD / "questions.json")
    assert len(examples) == 440
    assert {e.answer_type for e in examples} == {"OPEN", "CLOSED"}
    assert all(Path(e.image).is_file() for e in examples)
    assert {e.organ for e in examples} == {"ABD", "CHEST", "HEAD"}
    assert load_vqa_rad(VQA_RAD)[0] == examples[0]  # a folder works too


def _vqa_rad_image(index: int = 0) -> Path:
    return sorted((VQA_RAD / "images").glob("*.jpg"))[index]


def test_slake_loader_filters_language_and_maps_fields(tmp_path):
    (tmp_path / "imgs" / "xmlab1").mkdir(parents=True)
    shutil.copy(_vqa_rad_image(), tmp_path / "imgs" / "xmlab1" / "source.jpg")
    base = {"img_name": "xmlab1/source.jpg", "content_type": "Organ", "location": "Lung", "answer_type": "OPEN"}
    records = [
        {**base, "qid": 1, "question": "Which organ?", "answer": "Lung", "q_lang": "en"},
        {**base, "qid": 2, "question": "Is it normal?", "answer": "No", "q_lang": "en", "answer_type": "CLOSED"},
        {**base, "qid": 3, "question": "哪个器官?", "answer": "肺", "q_lang": "zh"},
    ]
    (tmp_path / "test.json").write_text(json.dumps(records, ensure_ascii=False))
    english = load_slake(tmp_path / "test.json")
    assert [e.qid for e in english] == ["1", "2"]
    assert english[1].answer_type == "CLOSED" and english[0].question_type == "Organ" and english[0].organ == "Lung"
    assert Path(english[0].image).is_file()
    assert len(load_slake(tmp_path, language="all")) == 3
    (tmp_path / "test.json").write_text(json.dumps([{"question": "Q", "answer": "A"}]))
    with pytest.raises(DatasetFormatError, match="img_name"):
        load_slake(tmp_path / "test.json")


def test_pathvqa_official_pickle_layout(tmp_path):
    qas, images = tmp_path / "pvqa" / "qas" / "test", tmp_path / "pvqa" / "images" / "test"
    qas.mkdir(parents=True)
    images.mkdir(parents=True)
    shutil.copy(_vqa_rad_image(), images / "test_0000.jpg")
    records = [
        {"image": "test_0000", "question": "Is this inflamed?", "answer": "yes"},
        {"image": "test_0000", "question": "What is shown?", "answer": "neutrophils"},
    ]
    (qas / "test_qa.pkl").write_bytes(pickle.dumps(records))
    examples = load_pathvqa(qas / "test_qa.pkl")
    assert [e.answer_type for e in examples] == ["CLOSED", "OPEN"]
    assert examples[0].image == str(images / "test_0000.jpg") and Path(examples[0].image).is_file()


def test_pathvqa_pickle_with_objects_is_refused(tmp_path):
    # A pickle that imports anything (here pathlib) could run code: refused, not loaded.
    (tmp_path / "test_qa.pkl").write_bytes(pickle.dumps([{"image": Path("x"), "question": "q", "answer": "a"}]))
    with pytest.raises(DatasetFormatError, match="refusing"):
        load_pathvqa(tmp_path / "test_qa.pkl", image_root=tmp_path)


def test_pathvqa_hugging_face_parquet_and_saved_layouts(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_bytes = [_vqa_rad_image(i).read_bytes() for i in range(2)]
    table = pa.table(
        {
            "image": [{"bytes": data, "path": None} for data in image_bytes],
            "question": ["Is there fibrosis?", "What stain is used?"],
            "answer": ["no", "H&E"],
        }
    )
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "test-00000-of-00001.parquet")
    from_parquet = load_pathvqa(tmp_path, split="test")
    assert [e.answer_type for e in from_parquet] == ["CLOSED", "OPEN"]
    assert [e.image_source() for e in from_parquet] == image_bytes  # read lazily, byte for byte
    with pytest.raises(DatasetFormatError, match="split 'validation'"):
        load_pathvqa(tmp_path, split="validation")

    saved = datasets.DatasetDict(
        {"test": datasets.Dataset.from_dict(table.to_pydict()).cast_column("image", datasets.Image())}
    )
    saved.save_to_disk(str(tmp_path / "saved"))
    from_disk = load_pathvqa(tmp_path / "saved", split="test")
    assert [(e.question, e.answer) for e in from_disk] == [(e.question, e.answer) for e in from_parquet]
    assert [Image.open(__import__("io").BytesIO(e.image_source())).size for e in from_disk] == [
        Image.open(_vqa_rad_image(i)).size for i in range(2)
    ]


def test_generic_jsonl_and_errors_do_not_echo_content(tmp_path):
    shutil.copy(_vqa_rad_image(), tmp_path / "a.jpg")
    lines = [
        {"image": "a.jpg", "question": "Is it normal?", "answer": "yes"},
        {"image": "a.jpg", "question": "Which side?", "answer": "left", "answer_type": "CLOSED", "qid": "q7"},
    ]
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    examples = load_jsonl(tmp_path / "set.jsonl")
    assert [(e.qid, e.answer_type) for e in examples] == [("0", "CLOSED"), ("q7", "CLOSED")]
    assert examples[0].image == str(tmp_path / "a.jpg")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "Patient DOE_JOHN: is it normal?"}) + "\n")
    with pytest.raises(DatasetFormatError) as raised:
        load_jsonl(tmp_path / "bad.jsonl")
    assert "DOE_JOHN" not in str(raised.value) and "image" in str(raised.value)


def test_medqa_loader(tmp_path):
    lines = [
        {"question": "Q1", "options": {"A": "x", "B": "y"}, "answer_idx": "B", "answer": "y"},
        {"question": "Q2", "options": ["first", "second", "third"], "answer": "third"},
        {"question": "Q3", "options": {"a": "x", "b": "y"}, "answer": "a"},
    ]
    (tmp_path / "mcq.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    examples = load_medqa(tmp_path / "mcq.jsonl")
    assert [e.answer for e in examples] == ["B", "C", "A"]
    assert examples[1].options == {"A": "first", "B": "second", "C": "third"}
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "Q", "options": ["x"], "answer": "Z"}))
    with pytest.raises(DatasetFormatError, match="neither an option letter"):
        load_medqa(tmp_path / "bad.jsonl")


def test_roco_loader_reads_the_shipped_captions():
    examples = load_roco(REPO_ROOT / "data" / "roco" / "roco_val_captions.csv", image_root="/images")
    assert len(examples) == 8179
    assert examples[0].qid == "ROCO_00020" and examples[0].answer == examples[0].answer.strip()
    assert examples[0].image == "/images/PMC3970251_CRIONM2014-931546.003.jpg"


def test_scoring_an_oracle_gives_full_marks():
    examples = load_vqa_rad(VQA_RAD)[:30]
    oracle = {e.qid: {"qid": e.qid, "prediction": e.answer} for e in examples}
    _, sections = score_vqa(examples, oracle)
    metrics = sections["metrics"]
    assert metrics["closed"]["llava_med_closed_accuracy"] == metrics["closed"]["strict_closed_accuracy"] == 1.0
    assert metrics["open"]["llava_med_open_recall"] == metrics["open"]["token_recall"] == 1.0
    assert metrics["overall"]["exact_match"] == metrics["overall"]["token_f1"] == 1.0
    assert all(group["overall"]["exact_match"] == 1.0 for group in sections["by_organ"].values())


def test_bad_arguments_raise_typed_errors():
    with pytest.raises(DatasetFormatError, match="--dataset"):
        EvaluationArguments(model="m", data_path="d", dataset="mimic")
    with pytest.raises(evaluate_vqa.InputError, match="batch_size"):
        EvaluationArguments(model="m", data_path="d", batch_size=0)


# --------------------------------------------------------------------------------------------------
# End to end with the tiny bundle over real VQA-RAD images
# --------------------------------------------------------------------------------------------------


def _arguments(bundle_dir, output_dir, **overrides) -> EvaluationArguments:
    values = {
        "model": str(bundle_dir),
        "dataset": "vqa_rad",
        "data_path": str(VQA_RAD / "questions.json"),
        "output_dir": str(output_dir),
        "limit": SUBSET,
        "batch_size": 3,
        "max_new_tokens": 6,
    }
    values.update(overrides)
    return EvaluationArguments(**values)


def _cli(args: EvaluationArguments) -> list[str]:
    return [
        "--model", args.model, "--dataset", args.dataset, "--data_path", args.data_path,
        "--output_dir", args.output_dir, "--limit", str(args.limit), "--batch_size", str(args.batch_size),
        "--max_new_tokens", str(args.max_new_tokens),
    ]  # fmt: skip


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    return env


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def single_run(bundle_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("eval_single")
    report = evaluate_vqa.main(_arguments(bundle_dir, output_dir))
    return output_dir, report


def test_end_to_end_vqa_rad(single_run, vqa):
    output_dir, report = single_run
    assert {p.name for p in output_dir.iterdir()} >= {
        "predictions.jsonl", "report.json", "report.md", "report.png", "run_config.json", "predictions"
    }  # fmt: skip
    records = _lines(output_dir / "predictions.jsonl")
    examples = load_vqa_rad(VQA_RAD)[:SUBSET]
    assert [r["qid"] for r in records] == [e.qid for e in examples]  # dataset order
    assert all(r["disclaimer"] == DISCLAIMER and r["error"] is None for r in records)
    assert all(r["expert"] == "radiology" and r["intermediate_text"] for r in records)
    # The harness's answers are the pipeline's answers.
    direct = vqa(
        [{"image": e.image, "question": e.question} for e in examples], batch_size=4, max_new_tokens=6, do_sample=False
    )
    assert [r["prediction"] for r in records] == [d["answer"] for d in direct]
    # The report is the metrics of those predictions, recomputed here.
    assert report == json.loads((output_dir / "report.json").read_text())
    assert report["n"] == SUBSET and report["n_errors"] == 0 and report["disclaimer"] == DISCLAIMER
    expected = aggregate(
        {**r, "scores": score_question(r["prediction"], r["answer"], r["answer_type"])} for r in records
    )
    assert report["metrics"] == expected
    assert set(report["by_organ"]) == {e.organ for e in examples}
    markdown = (output_dir / "report.md").read_text()
    assert "llava_med_closed_accuracy" in markdown and "## By organ" in markdown and DISCLAIMER in markdown
    with Image.open(output_dir / "report.png") as chart:
        assert chart.format == "PNG" and chart.size[0] > 300


def test_a_bad_image_costs_one_answer_not_the_run(bundle_dir, tmp_path):
    shutil.copy(_vqa_rad_image(), tmp_path / "good.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 truncated patient-secret")
    lines = [
        {"image": "good.jpg", "question": "Is it normal?", "answer": "yes"},
        {"image": "broken.jpg", "question": "Which organ?", "answer": "liver"},
        {"image": "good.jpg", "question": "Which organ?", "answer": "brain"},
    ]
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    args = _arguments(bundle_dir, tmp_path / "out", dataset="jsonl", data_path=str(tmp_path / "set.jsonl"), limit=None)
    report = evaluate_vqa.main(args)
    records = _lines(tmp_path / "out" / "predictions.jsonl")
    assert report["n_errors"] == 1
    assert [r["error"] is None for r in records] == [True, False, True]
    assert records[1]["error"].startswith(("ImageInputError", "InvalidImageError", "UnsupportedImageFormatError"))
    assert "patient-secret" not in records[1]["error"] and records[1]["prediction"] == ""


def test_resuming_with_other_settings_is_refused_and_the_group_is_ended(single_run, bundle_dir, monkeypatch):
    from accelerate import PartialState

    ended = []
    original = PartialState.destroy_process_group
    monkeypatch.setattr(PartialState, "destroy_process_group", lambda self, group=None: ended.append(original(self)))
    output_dir, _ = single_run
    with pytest.raises(ResumeMismatchError, match="max_new_tokens"):
        evaluate_vqa.main(_arguments(bundle_dir, output_dir, max_new_tokens=3))
    assert len(ended) == 1  # even on failure, the rank ends its process group


def test_resume_after_kill(single_run, bundle_dir, tmp_path):
    """SIGKILL mid-run, tear the last line, rerun: finished questions are kept and not redone."""
    output_dir = tmp_path / "killed"
    args = _arguments(bundle_dir, output_dir, batch_size=1)
    shard = output_dir / "predictions" / "rank-0.jsonl"
    process = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "evaluate_vqa.py"), *_cli(args)],
        cwd=REPO_ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if shard.exists() and shard.read_text().count("\n") >= 2:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    finished = [line for line in shard.read_text().splitlines(keepends=True) if line.endswith("\n")]
    assert 2 <= len(finished) < SUBSET, "the run must be killed part way for this test to mean anything"
    with shard.open("a") as handle:  # a write torn by the kill
        handle.write('{"qid": "torn", "predic')

    report = evaluate_vqa.main(args)

    resumed = shard.read_text()
    assert resumed.startswith("".join(finished))  # finished predictions kept byte for byte
    assert "torn" not in resumed
    assert report["predicted_in_this_run_by_main_process"] == SUBSET - len(finished)  # nothing redone
    assert len(read_predictions(output_dir / "predictions")) == SUBSET == resumed.count("\n")
    # Same predictions as the uninterrupted run.
    assert _lines(output_dir / "predictions.jsonl") == _lines(single_run[0] / "predictions.jsonl")


def test_two_processes_give_the_same_predictions_as_one(single_run, bundle_dir, tmp_path):
    args = _arguments(bundle_dir, tmp_path / "two", batch_size=2)
    accelerate = Path(sys.executable).with_name("accelerate")
    result = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
         str(REPO_ROOT / "evaluate_vqa.py"), *_cli(args)],
        cwd=REPO_ROOT, env={**_env(), "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    shards = {p.name: p.read_text().count("\n") for p in (tmp_path / "two" / "predictions").glob("*.jsonl")}
    assert shards == {"rank-0.jsonl": SUBSET // 2, "rank-1.jsonl": SUBSET // 2}  # really two processes
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["num_processes"] == 2
    assert _lines(tmp_path / "two" / "predictions.jsonl") == _lines(single_run[0] / "predictions.jsonl")
    assert report["metrics"] == single_run[1]["metrics"]


# --------------------------------------------------------------------------------------------------
# Multiple-choice QA and captions
# --------------------------------------------------------------------------------------------------


def test_medqa_multiple_choice_end_to_end(bundle_dir, tmp_path):
    lines = [
        {"question": "Which drug is an anticoagulant?", "options": {"A": "Heparin", "B": "Insulin"}, "answer_idx": "A"},
        {"question": "Which organ makes insulin?", "options": ["Liver", "Pancreas", "Spleen"], "answer": "Pancreas"},
        {"question": "Which vitamin prevents scurvy?", "options": {"A": "C", "B": "D"}, "answer_idx": "A"},
    ]
    (tmp_path / "mcq.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    args = _arguments(bundle_dir, tmp_path / "out", dataset="medqa", data_path=str(tmp_path / "mcq.jsonl"), limit=None)
    report = evaluate_vqa.main(args)
    records = _lines(tmp_path / "out" / "predictions.jsonl")
    assert [r["answer"] for r in records] == ["A", "B", "A"]
    assert all(r["choice"] in (None, *r["options"]) for r in records)
    assert all(r["choice"] == extract_choice(r["prediction"], r["options"], r["options"]) for r in records)
    assert report["metrics"]["accuracy"] == sum(r["correct"] for r in records) / 3
    assert report["metrics"]["unparsed_rate"] == sum(r["choice"] is None for r in records) / 3
    assert (tmp_path / "out" / "report.png").stat().st_size > 0


def test_mcq_prompt_lists_every_option():
    example = Example(qid="1", question=" Which? ", answer="B", options={"A": "x", "B": "y"})
    assert evaluate_vqa.mcq_prompt(example) == f"Which?\n\nA. x\nB. y\n\n{evaluate_vqa.MCQ_INSTRUCTION}"


def test_captions_are_the_pipelines_radiology_captions(vqa):
    images = [str(_vqa_rad_image(i)) for i in range(3)]
    examples = [Example(qid=str(i), question="", answer="ref", image=image) for i, image in enumerate(images)]
    examples.append(Example(qid="missing", question="", answer="ref", image="/nonexistent/ROCO_1.jpg"))
    records = evaluate_vqa.caption_predictor(vqa, {"do_sample": False})(examples)
    direct = [vqa({"image": image, "question": "Describe."})["intermediate_text"] for image in images]
    assert [r["prediction"] for r in records[:3]] == direct
    assert records[3]["prediction"] == "" and records[3]["error"].startswith("InvalidImageError")


def _roco_subset(tmp_path: Path) -> Path:
    """A ROCO-format CSV over real VQA-RAD images, with real ROCO captions as references."""
    from tiny_bundle import roco_captions

    captions = roco_captions(4)
    with (tmp_path / "roco_val.csv").open("w", newline="") as handle:
        import csv

        writer = csv.writer(handle)
        writer.writerow(["id", "name", "caption"])
        for i in range(4):
            writer.writerow([f"ROCO_{i:05d}", _vqa_rad_image(i).name, f" {captions[i]}\n"])
    return tmp_path / "roco_val.csv"


def test_roco_caption_evaluation(bundle_dir, tmp_path):
    pytest.importorskip("caption_metrics")
    csv_path = _roco_subset(tmp_path)
    args = _arguments(
        bundle_dir, tmp_path / "out", dataset="roco", data_path=str(csv_path), image_root=str(VQA_RAD / "images"),
        limit=None,
    )  # fmt: skip
    report = evaluate_vqa.main(args)
    assert report["task"] == "captions" and report["n"] == 4 and report["n_errors"] == 0
    assert set(report["metrics"]) == {"n", "bleu4", "rouge_l", "cider"}
    records = _lines(tmp_path / "out" / "predictions.jsonl")
    from caption_metrics import score_captions

    expected = score_captions([r["prediction"] for r in records], [[r["reference"]] for r in records])
    assert {key: report["metrics"][key] for key in ("bleu4", "rouge_l", "cider")} == {
        key: expected[key] for key in ("bleu4", "rouge_l", "cider")
    }


def test_recipe_file_and_command_line_parse_to_the_same_arguments(tmp_path):
    (tmp_path / "recipe.yaml").write_text(
        "model: bundle\ndataset: slake\ndata_path: Slake1.0/test.json\nbatch_size: 4\nlanguage: all\n"
    )
    from_file = evaluate_vqa.parse_arguments(["--config", str(tmp_path / "recipe.yaml")])
    from_flags = evaluate_vqa.parse_arguments(
        ["--model", "bundle", "--dataset", "slake", "--data_path", "Slake1.0/test.json", "--batch_size", "4",
         "--language", "all"]
    )  # fmt: skip
    assert from_file == from_flags
    assert (from_file.dataset, from_file.batch_size, from_file.language) == ("slake", 4, "all")
