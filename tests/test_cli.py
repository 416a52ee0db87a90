"""The visual-med-alpaca command line: commands, exit codes (in subprocesses), batch resume."""

import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_pipeline import without_cache_flag

from modeling_visual_med_alpaca import DISCLAIMER
from visual_med_alpaca_cli import EXIT_BAD_INPUT, EXIT_MODEL_LOAD, EXIT_OK, main

REPO_ROOT = Path(__file__).resolve().parents[1]
CLI = REPO_ROOT / "visual_med_alpaca_cli.py"


def run_cli(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, str(CLI), *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd, env=env
    )


def test_help_lists_commands_examples_and_exit_codes():
    result = run_cli("--help")
    assert result.returncode == EXIT_OK
    for text in ("ask", "caption", "batch", "examples:", "exit codes: 0 done, 2 bad input, 3 model"):
        assert text in result.stdout


@pytest.mark.parametrize("command", ["ask", "caption", "batch"])
def test_subcommand_help_shows_only_its_own_runnable_examples(command):
    from visual_med_alpaca_cli import build_parser

    result = run_cli(command, "--help")
    assert result.returncode == EXIT_OK
    examples = [
        line.strip() for line in result.stdout.split("examples:")[1].splitlines() if "visual-med-alpaca" in line
    ]
    assert examples, result.stdout
    for example in examples:
        program, name, *rest = shlex.split(example)
        assert (program, name) == ("visual-med-alpaca", command), example  # not "visual-med-alpaca ask caption ..."
        parsed = build_parser().parse_args([name, *rest])  # each example parses
        assert parsed.command == command


def test_url_error_names_no_flag_the_cli_lacks(bundle_dir):
    result = run_cli("ask", "--model", bundle_dir, "--image", "https://example.org/chest.png", "What is seen?")
    assert result.returncode == EXIT_BAD_INPUT
    assert "download the image first" in result.stderr and "allow_urls" not in result.stderr
    assert result.stderr.count("\n") == 1


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "visual-med-alpaca"
    assert script.exists(), "make install installs the project (pip install -e .), which creates the command"
    result = subprocess.run([str(script), "ask", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == EXIT_OK and "--load-in-8bit" in result.stdout and "--show-prompt" in result.stdout


def test_ask_json_equals_the_pipeline_record(bundle_dir, radiology_images, vqa):
    image = radiology_images[0]
    result = run_cli("ask", "--model", bundle_dir, "--image", image, "--json", "--show-prompt", "What is seen?")
    assert result.returncode == EXIT_OK, result.stderr
    record = json.loads(result.stdout)
    expected = vqa({"image": str(image), "question": "What is seen?"}, return_prompt=True)
    assert without_cache_flag(record) == without_cache_flag(expected)
    assert record["disclaimer"] == DISCLAIMER and record["expert"] == "radiology"


def test_ask_streams_the_answer_with_its_provenance(bundle_dir, radiology_images, vqa):
    image = radiology_images[1]
    result = run_cli("ask", "--model", bundle_dir, "--image", image, "--max-new-tokens", "6", "Which organ?")
    assert result.returncode == EXIT_OK, result.stderr
    expected = vqa({"image": str(image), "question": "Which organ?"}, max_new_tokens=6)
    streamed, _, provenance = result.stdout.partition("\nExpert: ")
    assert streamed.startswith("Answer: ") and streamed.removeprefix("Answer: ").strip() == expected["answer"]
    lines = ("Expert: " + provenance).splitlines()
    assert f"Expert: {expected['expert']}" in lines
    assert f"Intermediate text: {expected['intermediate_text']}" in lines
    assert f"Disclaimer: {DISCLAIMER}" in lines
    assert "Prompt:" not in result.stdout  # only with --show-prompt
    assert result.stderr == ""


def test_caption_prints_only_the_experts_text(bundle_dir, radiology_images, vqa):
    result = run_cli("caption", "--model", bundle_dir, radiology_images[2])
    assert result.returncode == EXIT_OK, result.stderr
    expected = vqa({"image": str(radiology_images[2]), "question": "q"})["intermediate_text"]
    assert result.stdout.strip() == expected


@pytest.mark.parametrize(
    "args",
    [
        ("ask", "--image", "does-not-exist.png", "What is seen?"),  # missing file
        ("ask", "   "),  # empty question
        ("ask", "--expert", "dermatology", "Q?"),  # argparse rejects the choice
    ],
)
def test_bad_input_exits_2_with_one_line(bundle_dir, args):
    command, *rest = args
    result = run_cli(command, "--model", bundle_dir, *rest)
    assert result.returncode == EXIT_BAD_INPUT, result.stderr
    if command == "ask" and "--expert" not in rest:
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
        assert "Traceback" not in result.stderr


def test_corrupt_image_exits_2_without_echoing_it(bundle_dir, tmp_path):
    bad = tmp_path / "scan.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"PATIENT-NAME-DOE" * 8)
    result = run_cli("ask", "--model", bundle_dir, "--image", bad, "What is seen?")
    assert result.returncode == EXIT_BAD_INPUT
    assert result.stderr.count("\n") == 1 and "PATIENT" not in result.stderr


def test_unloadable_model_exits_3_naming_the_cause(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli("ask", "--model", tmp_path / "empty", "Q?")
    assert result.returncode == EXIT_MODEL_LOAD
    assert result.stderr.startswith("error: Could not load the model") and result.stderr.count("\n") == 1
    assert "OSError" in result.stderr or "ValueError" in result.stderr  # the cause, not only "could not load"


def _answers(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batch_over_jsonl_resumes_and_matches_single_answers(bundle_dir, radiology_images, vqa, tmp_path, capsys):
    rows = [{"id": f"r{i}", "image": str(p), "question": f"Question {i}?"} for i, p in enumerate(radiology_images)]
    rows.append({"id": "text-only", "question": "What treats hair loss?"})
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    output = tmp_path / "out" / "answers.jsonl"
    args = ["batch", "--model", str(bundle_dir), "--output", str(output), "--batch-size", "2", "--max-new-tokens", "5"]

    # An interrupted run: only the first three rows were written, the last line torn.
    source_first = tmp_path / "first.jsonl"
    source_first.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    assert main([*args, str(source_first)]) == EXIT_OK
    with output.open("a") as handle:
        handle.write('{"id": "r3", "ans')
    assert main([*args, str(source)]) == EXIT_OK
    records = [r for r in _answers_tolerant(output)]
    assert sorted(r["id"] for r in records) == sorted(r["id"] for r in rows)  # each row once: skipped, not redone
    for row in rows:
        record = next(r for r in records if r["id"] == row["id"])
        expected = vqa({"image": row.get("image"), "question": row["question"]}, max_new_tokens=5)
        assert (record["question"], record["image"]) == (row["question"], row.get("image"))  # which row it answers
        answer = {k: v for k, v in record.items() if k not in ("id", "question", "image")}
        assert without_cache_flag(answer) == without_cache_flag(expected)
    # A third run has nothing to do.
    assert main([*args, str(source)]) == EXIT_OK
    assert "already answered" in capsys.readouterr().out


def _answers_tolerant(path: Path) -> list[dict]:
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def test_batch_over_folder_and_csv_records_bad_rows(bundle_dir, radiology_images, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for image in radiology_images[:2]:
        shutil.copy(image, folder / image.name)
    folder_out = tmp_path / "folder.jsonl"
    common = ["--model", str(bundle_dir), "--max-new-tokens", "3"]
    assert main(["batch", *common, "--question", "What is seen?", "--output", str(folder_out), str(folder)]) == 0
    assert sorted(r["id"] for r in _answers(folder_out)) == sorted(p.name for p in radiology_images[:2])
    assert main(["batch", *common, "--output", str(folder_out), str(folder)]) == EXIT_BAD_INPUT  # no --question

    table = tmp_path / "rows.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "question"])
        writer.writerow([f"images/{radiology_images[0].name}", "What is seen?"])
        writer.writerow(["images/missing.png", "What is seen?"])
    csv_out = tmp_path / "csv.jsonl"
    assert main(["batch", *common, "--output", str(csv_out), str(table)]) == EXIT_BAD_INPUT
    records = {r["id"]: r for r in _answers(csv_out)}
    assert "answer" in records["0"] and records["1"]["error_type"] == "InvalidImageError"
    assert records["1"]["image"] == "images/missing.png" and records["1"]["question"] == "What is seen?"
    assert main(["batch", *common, "--output", str(tmp_path / "x.jsonl"), str(tmp_path / "nope.csv")]) == 2


def test_ask_load_in_8bit_runs_on_cpu(bundle_dir):
    """--load-in-8bit maps to the bundle's BitsAndBytes config (language model blocks only)."""
    result = run_cli("ask", "--model", bundle_dir, "--load-in-8bit", "--json", "--max-new-tokens", "3", "Q?")
    assert result.returncode == EXIT_OK, result.stderr
    record = json.loads(result.stdout)
    assert record["disclaimer"] == DISCLAIMER and record["expert"] is None and isinstance(record["answer"], str)


def test_batch_rerun_keeps_one_line_per_id_and_a_bad_json_line_is_a_bad_row(bundle_dir, radiology_images, tmp_path):
    source = tmp_path / "rows.jsonl"
    good = {"id": "good", "image": str(radiology_images[0]), "question": "What is seen?"}
    missing = {"id": "missing", "image": str(tmp_path / "missing.png"), "question": "What is seen?"}
    source.write_text(json.dumps(good) + "\n" + '{"id": "torn", "image": ' + "\n" + json.dumps(missing) + "\n")
    output = tmp_path / "answers.jsonl"
    args = ["batch", "--model", str(bundle_dir), "--output", str(output), "--max-new-tokens", "3", str(source)]
    for _ in range(3):  # the first run and two reruns: the bad rows fail again each time
        assert main(args) == EXIT_BAD_INPUT
        records = _answers(output)
        ids = [r["id"] for r in records]
        assert sorted(ids) == ["1", "good", "missing"] and len(set(ids)) == len(ids)  # each id once
        by_id = {r["id"]: r for r in records}
        assert "answer" in by_id["good"]
        assert by_id["1"]["error_type"] == "BadBatchRowError" and "Row 2" in by_id["1"]["error"]
        assert by_id["missing"]["error_type"] == "InvalidImageError"
    # Fixing the bad line: the next run answers it and no error line is left for it.
    source.write_text(json.dumps(good) + "\n" + json.dumps({"question": "What treats hair loss?"}) + "\n")
    assert main(args) == EXIT_OK
    by_id = {r["id"]: r for r in _answers(output)}
    assert "answer" in by_id["1"] and "error" not in by_id["1"] and by_id["1"]["image"] is None
