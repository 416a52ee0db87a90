"""train_git.py on a tiny GIT (tiny_bundle recipe): synthetic images paired with real ROCO captions."""

import csv
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import TrainerCallback

from tiny_bundle import ROCO_CAPTIONS_CSV, build_captioner

REPO_ROOT = Path(__file__).resolve().parents[1]

CSV_FIELDS = ["id", "name", "caption"]


@pytest.fixture(scope="module")
def tiny_git_dir(tmp_path_factory):
    model, processor = build_captioner(seed=0)
    folder = tmp_path_factory.mktemp("tiny-git")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def roco_rows():
    """Real ROCO rows exactly as shipped (captions still wrapped in a space and a newline)."""
    with ROCO_CAPTIONS_CSV.open(newline="", encoding="utf-8") as handle:
        return [row for _, row in zip(range(40), csv.DictReader(handle), strict=False)]


def write_images(folder, rows, size=40, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for row in rows:
        pixels = rng.integers(0, 256, (size, size), dtype=np.uint8)
        Image.fromarray(pixels, mode="L").convert("RGB").save(folder / row["name"])


def write_csv(path, rows):
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, CSV_FIELDS)
        writer.writeheader()
        writer.writerows({k: row[k] for k in CSV_FIELDS} for row in rows)
    return path


@pytest.fixture(scope="module")
def caption_csvs(tmp_path_factory, roco_rows):
    """The original layout: train.csv (16 rows) + val.csv (4 rows) + images/."""
    root = tmp_path_factory.mktemp("roco-csv")
    write_images(root / "images", roco_rows[:20])
    return write_csv(root / "train.csv", roco_rows[:16]), write_csv(root / "val.csv", roco_rows[16:20])


def cli_args(tiny_git_dir, output_dir, *extra):
    return [
        "--model_name_or_path",
        str(tiny_git_dir),
        "--output_dir",
        str(output_dir),
        "--per_device_train_batch_size",
        "4",
        "--per_device_eval_batch_size",
        "4",
        "--learning_rate",
        "3e-3",
        "--logging_steps",
        "1",
        "--report_to",
        "none",
        "--use_cpu",
        "--seed",
        "0",
        "--generation_max_new_tokens",
        "8",
        "--dataloader_num_workers",
        "0",
        *extra,
    ]


def csv_args(caption_csvs):
    train_csv, val_csv = caption_csvs
    return [
        "--train_file",
        str(train_csv),
        "--validation_file",
        str(val_csv),
        "--image_dir",
        str(train_csv.parent / "images"),
    ]


# ------------------------------------------------------------------------------------------ metrics


def test_caption_metrics_match_hand_computed_values():
    from caption_metrics import score_captions

    # 1- to 4-gram precisions 4/5, 3/4, 2/3, 1/2, no brevity penalty; LCS 4 of 5 both ways.
    scores = score_captions(["a b c d e"], [["a b c d f"]])
    assert scores["bleu4"] == pytest.approx((0.8 * 0.75 * (2 / 3) * 0.5) ** 0.25, rel=1e-6)
    assert scores["rouge_l"] == pytest.approx(0.8)
    # ROUGE-L with beta 1.2: LCS 3, precision 3/3, recall 3/5 -> 2.44 * 0.6 / (0.6 + 1.44).
    assert score_captions(["a b c"], [["a b x c y"]])["rouge_l"] == pytest.approx(2.44 * 0.6 / 2.04)
    # CIDEr-D over two images, every reference n-gram in one document: idf = log 2 for all.
    # Image 1 identical 2-word captions: cosine 1 for 1- and 2-grams, 0 for 3/4-grams -> 10 * 2/4 = 5.
    # Image 2 "c d" vs "c e": 1-gram cosine (log2)^2 / (2 (log2)^2) = 1/2, nothing else -> 10 * 0.5/4 = 1.25.
    assert score_captions(["a b", "c d"], [["a b"], ["c e"]])["cider"] == pytest.approx((5.0 + 1.25) / 2)
    # Case and punctuation do not count; the coco-caption tokenisation keeps "x-ray" whole.
    perfect = score_captions(["X-ray, of the CHEST."], [["x-ray of the chest"]])
    assert perfect["bleu4"] == pytest.approx(1.0) and perfect["rouge_l"] == pytest.approx(1.0)
    assert set(scores) == {"bleu4", "rouge_l", "cider"}


def test_caption_metrics_reject_mismatched_input():
    from caption_metrics import score_captions

    with pytest.raises(ValueError, match="2 predictions but 1"):
        score_captions(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="non-empty list"):
        score_captions(["a"], ["a"])
    with pytest.raises(ValueError, match="at least one"):
        score_captions([], [])


# --------------------------------------------------------------------------------------------- data


def test_collator_labels_are_minus_100_exactly_at_padding(tiny_git_dir, caption_csvs):
    from transformers import GitProcessor

    from train_git import CaptionCollator, CaptionDataset, read_caption_csv

    processor = GitProcessor.from_pretrained(tiny_git_dir)
    records = read_caption_csv(caption_csvs[0], caption_csvs[0].parent / "images")[:6]
    dataset = CaptionDataset(records, processor, max_caption_tokens=64)
    batch = CaptionCollator(processor.tokenizer)([dataset[i] for i in range(len(dataset))])
    padding = batch["attention_mask"] == 0
    assert padding.any(), "captions of different lengths must produce padding"
    assert (batch["input_ids"][padding] == processor.tokenizer.pad_token_id).all()
    assert (batch["labels"][padding] == -100).all()
    assert torch.equal(batch["labels"][~padding], batch["input_ids"][~padding])
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "labels"}  # no token_type_ids
    assert batch["pixel_values"].shape == (6, 3, 32, 32)


@pytest.fixture(scope="module")
def messy_data(tmp_path_factory, roco_rows):
    """Twelve real captions; five rows are bad, three images have odd modes that are normalised."""
    root = tmp_path_factory.mktemp("messy")
    rows = [dict(row) for row in roco_rows[:12]]
    write_images(root / "images", rows)
    images = root / "images"
    (images / rows[0]["name"]).unlink()  # missing image
    data = (images / rows[1]["name"]).read_bytes()
    (images / rows[1]["name"]).write_bytes(data[: len(data) // 2])  # truncated PNG
    (images / rows[2]["name"]).write_bytes(b"this is not an image at all")  # unreadable
    rows[3]["caption"] = " \n"  # empty caption
    rows[7]["name"] = ""  # names no image
    ramp = (np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) * 40).astype(np.uint16)
    Image.fromarray(ramp).save(images / rows[4]["name"], format="PNG")  # 16-bit grayscale
    Image.new("RGBA", (40, 40), (200, 10, 10, 128)).save(images / rows[5]["name"], format="PNG")
    Image.new("CMYK", (40, 40), (10, 200, 30, 0)).save(images / rows[6]["name"], format="JPEG")
    bad_ids = {rows[i]["id"] for i in (0, 1, 2, 3, 7)}
    return write_csv(root / "train.csv", rows), bad_ids


def test_bad_rows_are_skipped_counted_and_named(messy_data):
    from train_git import CaptionDataArguments, prepare_caption_data

    train_csv, bad_ids = messy_data
    splits, report = prepare_caption_data(
        CaptionDataArguments(
            train_file=str(train_csv), image_dir=str(train_csv.parent / "images"), max_bad_fraction=0.5
        ),
        show_progress=False,
    )
    assert report.rows == 12
    assert {row.example_id for row in report.bad_rows} == bad_ids
    reasons = {row.example_id: row.reason for row in report.bad_rows}
    assert any("not found" in r for r in reasons.values()) and any(r == "empty caption" for r in reasons.values())
    assert all("\n" not in r and "ROCO" not in r for r in reasons.values())  # no payload echoed
    assert dict(report.normalised_modes) == {"I;16": 1, "RGBA": 1, "CMYK": 1}
    assert len(splits["train"]) == 7
    assert all(r.caption == r.caption.strip() and r.caption for r in splits["train"])


def test_too_many_bad_rows_fail_clearly_and_list_them(messy_data, tmp_path):
    from train_git import CaptionDataArguments, CaptionDataError, prepare_caption_data

    train_csv, bad_ids = messy_data
    args = CaptionDataArguments(train_file=str(train_csv), image_dir=str(train_csv.parent / "images"))
    with pytest.raises(CaptionDataError, match=r"5 of 12 rows \(41\.7%\) are unusable.*max_bad_fraction"):
        prepare_caption_data(args, show_progress=False, report_dir=tmp_path)
    listed = json.loads((tmp_path / "bad_rows.json").read_text())
    assert {row["example_id"] for row in listed} == bad_ids


def test_imagefolder_roco_and_datasets_layouts_give_the_same_rows(tmp_path, roco_rows):
    import datasets

    from train_git import CaptionDataArguments, load_caption_splits

    rows = roco_rows[:6]
    expected = [(row["id"], row["caption"].strip()) for row in rows]

    # imagefolder: train/ with metadata.jsonl, validation/ with metadata.csv
    write_images(tmp_path / "folder" / "train", rows[:4])
    write_images(tmp_path / "folder" / "validation", rows[4:])
    with (tmp_path / "folder" / "train" / "metadata.jsonl").open("w") as handle:
        for row in rows[:4]:
            handle.write(json.dumps({"file_name": row["name"], "text": row["caption"], "id": row["id"]}) + "\n")
        handle.write('{"file_name": "broken.png", "text": \n')  # a malformed line is a bad row, not a crash
    with (tmp_path / "folder" / "validation" / "metadata.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "text"])
        writer.writerows([row["name"], row["caption"]] for row in rows[4:])
    folder = load_caption_splits(CaptionDataArguments(data_dir=str(tmp_path / "folder")))
    assert [(r.example_id, r.caption.strip()) for r in folder["train"][:4]] == expected[:4]  # ids from metadata
    assert folder["train"][4].problem == "metadata.jsonl line 5 is not valid JSON"
    assert [r.example_id for r in folder["validation"]] == [r["name"] for r in rows[4:]]  # no id: the file name
    assert len(folder["validation"]) == 2 and os.path.isfile(folder["validation"][0].image)

    # ROCO checkout after scripts/fetch.py: captions.txt / dlinks.txt + images/PMCID_NAME
    for split, split_rows in (("train", rows[:4]), ("validation", rows[4:])):
        category = tmp_path / "roco-dataset" / "data" / split / "radiology"
        category.mkdir(parents=True)
        (category / "captions.txt").write_text(
            "".join(f"{r['id']}\t{r['caption'].rstrip(chr(10))}\n" for r in split_rows)
        )
        links = []
        for row in split_rows:
            pmc_id, image_name = row["name"].split("_", 1)
            url = f"ftp://ftp.ncbi.nlm.nih.gov/pub/pmc/oa_package/ab/cd/{pmc_id}.tar.gz"
            links.append(f"{row['id']}\twget -r {url} -P /path/to/Dir\t{image_name}\n")
        (category / "dlinks.txt").write_text("".join(links))
        write_images(category / "images", split_rows)
    roco = load_caption_splits(CaptionDataArguments(data_dir=str(tmp_path / "roco-dataset")))
    assert [(r.example_id, r.caption.strip()) for r in roco["train"] + roco["validation"]] == expected
    assert all(os.path.isfile(r.image) for r in roco["train"] + roco["validation"])

    # a datasets dataset with an Image column, saved to disk
    images = [str(tmp_path / "folder" / "train" / r["name"]) for r in rows[:4]]
    hf = datasets.Dataset.from_dict(
        {"image": images, "caption": [r["caption"] for r in rows[:4]], "id": [r["id"] for r in rows[:4]]}
    ).cast_column("image", datasets.Image())
    datasets.DatasetDict({"train": hf}).save_to_disk(str(tmp_path / "saved"))
    saved = load_caption_splits(CaptionDataArguments(dataset_name=str(tmp_path / "saved")))
    assert [(r.example_id, r.caption.strip()) for r in saved["train"]] == expected[:4]
    assert "validation" not in saved


# ----------------------------------------------------------------------------------------- training


def test_training_loss_falls_and_saves_a_loadable_captioner(tiny_git_dir, caption_csvs, messy_data, tmp_path, caplog):
    from transformers import GitForCausalLM, GitProcessor

    from modeling_visual_med_alpaca import DISCLAIMER
    from train_git import main, parse_args

    # Training rows: the messy set (5 bad rows, 3 odd modes) - it must train and report them at the end.
    train_csv, bad_ids = messy_data
    args = parse_args(
        cli_args(tiny_git_dir, tmp_path / "out", "--max_steps", "24", "--eval_strategy", "no", "--save_strategy", "no")
        + ["--train_file", str(train_csv), "--image_dir", str(train_csv.parent / "images")]
        + ["--max_bad_fraction", "0.5", "--validation_fraction", "0.25"]
    )
    with caplog.at_level(logging.INFO, logger="train_git"):
        result = main(*args)
    losses = [entry["loss"] for entry in result.trainer.state.log_history if "loss" in entry]
    assert len(losses) == 24
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.3
    named = caplog.text
    assert all(example_id in named for example_id in bad_ids)
    assert "Skipped" in named
    for key in ("eval_loss", "eval_bleu4", "eval_rouge_l", "eval_cider"):
        assert key in result.eval_metrics
    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file() and not (out / "pytorch_model.bin").exists()
    model = GitForCausalLM.from_pretrained(out)
    processor = GitProcessor.from_pretrained(out)
    assert processor.tokenizer.model_input_names == ["input_ids", "attention_mask"]
    assert model.config.vocab_size == len(processor.tokenizer)
    card = (out / "README.md").read_text()
    assert DISCLAIMER in card and "eval_cider" in card
    summary = json.loads((out / "run_summary.json").read_text())
    assert len(result.trainer.train_dataset) == 5 and len(result.trainer.eval_dataset) == 2
    assert summary["bad_rows"] == 5 and summary["world_size"] == 1 and summary["hub_url"] is None


def test_batched_evaluation_captions_equal_one_at_a_time(tiny_git_dir, caption_csvs):
    from transformers import GitForCausalLM, GitProcessor

    from train_git import CaptionDataset, generate_captions, read_caption_csv

    model = GitForCausalLM.from_pretrained(tiny_git_dir).eval()
    dataset = CaptionDataset(
        read_caption_csv(caption_csvs[0], caption_csvs[0].parent / "images")[:8],
        GitProcessor.from_pretrained(tiny_git_dir),
    )
    batched = generate_captions(model, dataset, batch_size=8, max_new_tokens=6)
    single = generate_captions(model, dataset, batch_size=1, max_new_tokens=6)
    assert batched == single and [i for i, _ in batched] == list(range(8))
    # Sharding across processes covers every image exactly once.
    shards = [generate_captions(model, dataset, 3, rank, 2, max_new_tokens=6) for rank in range(2)]
    assert sorted(shards[0] + shards[1]) == batched


class StepRecorder(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


KILLING_RUNNER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    from transformers import TrainerCallback
    import train_git

    class KillMidRun(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:  # after checkpoint-4, before checkpoint-6
                os.kill(os.getpid(), signal.SIGKILL)

    train_git.main(*train_git.parse_args(sys.argv[1:]), callbacks=[KillMidRun()])
    """
)


def test_killed_run_resumes_to_the_same_weights(tiny_git_dir, caption_csvs, tmp_path, caplog):
    from safetensors.torch import load_file

    from train_git import main, parse_args

    def run_args(output_dir):
        return (
            cli_args(tiny_git_dir, output_dir, "--max_steps", "8", "--save_steps", "2", "--eval_strategy", "no")
            + csv_args(caption_csvs)
            + ["--caption_metrics", "false", "--include_num_input_tokens_seen", "true"]
        )

    runner = tmp_path / "killing_runner.py"
    runner.write_text(KILLING_RUNNER.format(repo=str(REPO_ROOT)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    killed = subprocess.run(
        [sys.executable, str(runner), *run_args(tmp_path / "killed")], env=env, capture_output=True, timeout=300
    )
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert (tmp_path / "killed" / "checkpoint-4").is_dir() and not (tmp_path / "killed" / "checkpoint-6").exists()
    assert not (tmp_path / "killed" / "model.safetensors").exists()

    steps_run = StepRecorder()
    resumed_args = parse_args(run_args(tmp_path / "killed") + ["--resume_from_checkpoint", "last"])
    with caplog.at_level(logging.INFO, logger="train_git"):
        resumed = main(*resumed_args, callbacks=[steps_run])
    assert f"Resuming from {tmp_path / 'killed' / 'checkpoint-4'} (optimizer step 4)" in caplog.text
    assert resumed.trainer.state.global_step == 8
    assert steps_run.steps == [5, 6, 7, 8]  # continued after checkpoint-4, did not start over

    straight = main(*parse_args(run_args(tmp_path / "straight")))
    # The token counter continued from the checkpoint instead of restarting at 0.
    assert resumed.trainer.state.num_input_tokens_seen == straight.trainer.state.num_input_tokens_seen > 0
    weights_resumed = load_file(tmp_path / "killed" / "model.safetensors")
    weights_straight = load_file(tmp_path / "straight" / "model.safetensors")
    for name, tensor in weights_straight.items():
        torch.testing.assert_close(weights_resumed[name], tensor, rtol=1e-5, atol=1e-6)


class FakeHubApi:
    """Stands in for HfApi: records calls; ``fail`` makes the upload raise like an unreachable Hub."""

    calls: list = []
    fail = False

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
        FakeHubApi.calls.append(("create_repo", repo_id, private))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, ignore_patterns=None, **kwargs):
        if FakeHubApi.fail:
            raise ConnectionError("Hub unreachable")
        FakeHubApi.calls.append(("upload_folder", repo_id, sorted(os.listdir(folder_path)), ignore_patterns))


@pytest.mark.parametrize("fail", [False, True], ids=["pushed", "push-fails"])
def test_push_to_hub_is_private_by_default_and_a_failure_keeps_the_model(
    tiny_git_dir, caption_csvs, tmp_path, monkeypatch, fail
):
    import train_git
    from hub_push import PUSH_EXCLUDE, HubPushError

    FakeHubApi.calls = []
    FakeHubApi.fail = fail
    monkeypatch.setattr(train_git, "HfApi", FakeHubApi)
    args = train_git.parse_args(
        cli_args(tiny_git_dir, tmp_path / "med-git", "--max_steps", "2", "--save_steps", "1", "--eval_strategy", "no")
        + csv_args(caption_csvs)
        + ["--push_to_hub", "--hub_model_id", "org/med-git", "--caption_metrics", "false"]
    )
    if fail:
        with pytest.raises(HubPushError) as raised:
            train_git.main(*args)
        result = raised.value.result
        assert raised.value.exit_code == 5 and "ConnectionError: Hub unreachable" in str(raised.value)
    else:
        result = train_git.main(*args)
    assert FakeHubApi.calls[0] == ("create_repo", "org/med-git", True)
    assert (tmp_path / "med-git" / "model.safetensors").is_file()
    summary = json.loads((tmp_path / "med-git" / "run_summary.json").read_text())
    if fail:
        assert result.hub_url is None and "hf upload org/med-git" in result.push_error
        assert summary["push_error"] == result.push_error
    else:
        _, repo_id, files, ignored = FakeHubApi.calls[1]
        assert {"model.safetensors", "config.json", "processor_config.json", "README.md"} <= set(files)
        assert ignored == list(PUSH_EXCLUDE) and result.hub_url.endswith("org/med-git") and result.push_error is None


def test_unreachable_hub_exits_5_keeps_the_model_and_prints_a_private_retry_that_works(
    tiny_git_dir, caption_csvs, tmp_path, monkeypatch
):
    """A real process against a Hub address that refuses connections: exit 5, not 0; the retry command, run through
    huggingface_hub's own CLI, creates a private repository and uploads the model but no checkpoint or pickled state."""
    from hub_cli import retry_command_from, run_hf_cli

    output_dir = tmp_path / "med-git"
    argv = cli_args(tiny_git_dir, output_dir, "--max_steps", "2", "--save_steps", "1", "--eval_strategy", "no")
    argv += csv_args(caption_csvs) + ["--push_to_hub", "--hub_model_id", "org/med-git", "--caption_metrics", "false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train_git.py"), *argv], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 5, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and "Pushing to org/med-git failed" in run.stderr
    assert (output_dir / "model.safetensors").is_file() and (output_dir / "checkpoint-2" / "optimizer.pt").is_file()
    assert json.loads((output_dir / "run_summary.json").read_text())["push_error"]

    uploaded = run_hf_cli(retry_command_from(run.stderr), monkeypatch)
    assert uploaded["repo_id"] == "org/med-git" and uploaded["private"] is True
    assert {"model.safetensors", "config.json", "README.md"} <= set(uploaded["uploaded"])
    leaked = [p for p in uploaded["uploaded"] if p.startswith("checkpoint-") or p.endswith((".pt", ".pth", ".bin"))]
    assert leaked == [] and "run_fingerprint.json" not in uploaded["uploaded"]


def test_a_public_run_retry_stays_public(tmp_path, monkeypatch):
    from hub_cli import run_hf_cli

    from hub_push import retry_command

    (tmp_path / "model.safetensors").write_bytes(b"w")
    assert run_hf_cli(retry_command("org/open", tmp_path, private=False), monkeypatch)["private"] is False
    excludes = ["checkpoint-*", "runs/*", "*.pt", "*.pth", "rng_state*", "training_args.bin", "run_fingerprint.json"]
    assert retry_command("org/x", tmp_path, private=True) == [
        *("hf", "upload", "org/x", str(tmp_path), ".", "--repo-type", "model", "--private"),
        *(argument for pattern in excludes for argument in ("--exclude", pattern)),
    ]


# ----------------------------------------------------------------------------- output folder and resume


def test_an_output_dir_of_another_run_is_refused_and_replaced_only_on_request(tiny_git_dir, caption_csvs, tmp_path):
    from train_git import main, parse_args
    from training_runs import OutputDirError, ResumeMismatchError

    output_dir = tmp_path / "med-git"

    def run(steps, *extra):
        argv = cli_args(tiny_git_dir, output_dir, "--max_steps", str(steps), "--save_steps", "2")
        return main(
            *parse_args(argv + csv_args(caption_csvs) + ["--eval_strategy", "no", "--caption_metrics", "false", *extra])
        )

    run(6)
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    before = sorted(str(p) for p in output_dir.rglob("*"))
    with pytest.raises(OutputDirError, match=r"different run .*max_steps \(6 there, 2 here\).*--overwrite_output_dir"):
        run(2)
    assert sorted(str(p) for p in output_dir.rglob("*")) == before  # nothing written, nothing deleted
    # The same settings again with checkpoints present: resume or start over, never a silent mix.
    with pytest.raises(OutputDirError, match="resume_from_checkpoint last"):
        run(6)
    # Resuming with other settings is refused, naming what differs.
    with pytest.raises(ResumeMismatchError, match=r"checkpoint-6 belongs to a run with other settings: learning_rate"):
        run(6, "--resume_from_checkpoint", "last", "--learning_rate", "1e-3")

    run(2, "--overwrite_output_dir", "true")
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-2"]  # no checkpoint-4/6 left
    card = (output_dir / "README.md").read_text()
    assert "2 optimizer steps (0.50 epochs)" in card and "3.0 epochs" not in card


def test_overwrite_never_deletes_a_folder_no_training_run_wrote(tiny_git_dir, caption_csvs, tmp_path):
    from train_git import main, parse_args
    from training_runs import OutputDirError

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.txt").write_text("keep me")
    argv = cli_args(tiny_git_dir, notes, "--max_steps", "1") + csv_args(caption_csvs) + ["--eval_strategy", "no"]
    with pytest.raises(OutputDirError, match="not empty"):
        main(*parse_args(argv))
    with pytest.raises(OutputDirError, match="no training run wrote"):
        main(*parse_args(argv + ["--overwrite_output_dir", "true"]))
    assert sorted(p.name for p in notes.iterdir()) == ["thesis.txt"]


def test_shipped_caption_layout_trains_as_documented(tiny_git_dir, tmp_path):
    """README: `train_git.py --data_dir DIR` with an imagefolder layout; data/vqa_rad_captions is the demo's."""
    from train_git import CaptionDataArguments, main, parse_args, prepare_caption_data

    splits, report = prepare_caption_data(
        CaptionDataArguments(data_dir=str(REPO_ROOT / "data" / "vqa_rad_captions")), show_progress=False
    )
    assert (len(splits["train"]), len(splits["validation"]), report.bad_rows) == (68, 6, [])
    argv = cli_args(tiny_git_dir, tmp_path / "out", "--max_steps", "1", "--eval_strategy", "no")
    result = main(
        *parse_args(argv + ["--data_dir", str(REPO_ROOT / "data" / "vqa_rad_captions"), "--caption_metrics", "false"])
    )
    assert result.trainer.state.global_step == 1 and (tmp_path / "out" / "model.safetensors").is_file()
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert summary["data"] == {"format": "imagefolder", "source": "vqa_rad_captions"} and summary["base_model"] is None


def test_shipped_caption_layout_is_what_its_builder_writes(tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "data" / "vqa_rad_captions"))
    import build_captions

    build_captions.write_layout(tmp_path)
    for split in ("train", "validation"):
        shipped = (REPO_ROOT / "data" / "vqa_rad_captions" / split / "metadata.csv").read_text()
        assert (tmp_path / split / "metadata.csv").read_text() == shipped


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_accelerate_run_from_a_config_file(tiny_git_dir, caption_csvs, tmp_path):
    import yaml

    train_csv, val_csv = caption_csvs
    recipe = {
        "model_name_or_path": str(tiny_git_dir),
        "train_file": str(train_csv),
        "validation_file": str(val_csv),
        "image_dir": str(train_csv.parent / "images"),
        "output_dir": str(tmp_path / "ddp"),
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 2,
        "max_steps": 4,
        "logging_steps": 1,
        "eval_strategy": "no",
        "save_strategy": "no",
        "report_to": "none",
        "generation_max_new_tokens": 6,
        "dataloader_num_workers": 0,
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        str(REPO_ROOT / "train_git.py"), "--config", str(tmp_path / "recipe.yaml"), "--learning_rate", "1e-3",
    ]  # fmt: skip
    run = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, timeout=400)
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    summary = json.loads((tmp_path / "ddp" / "run_summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["train"]["total_flos"] >= 0 and set(summary["eval"]) >= {"eval_loss", "eval_cider"}
    assert (tmp_path / "ddp" / "model.safetensors").is_file()
    args = json.loads((tmp_path / "ddp" / "all_results.json").read_text())
    assert "eval_bleu4" in args


def test_config_file_sets_defaults_and_the_command_line_overrides_them(tmp_path):
    import yaml

    from train_git import parse_args

    (tmp_path / "recipe.yaml").write_text(
        yaml.safe_dump(
            {"train_file": "train.csv", "output_dir": "med-git", "learning_rate": 1e-4, "max_bad_fraction": 0.1}
        )
    )
    model_args, data_args, training_args = parse_args(
        ["--config", str(tmp_path / "recipe.yaml"), "--learning_rate", "3e-5"]
    )
    assert model_args.model_name_or_path == "microsoft/git-base"
    assert data_args.train_file == "train.csv" and data_args.max_bad_fraction == 0.1
    assert training_args.learning_rate == 3e-5 and training_args.output_dir == "med-git"


def test_an_unloadable_model_is_a_typed_error_after_the_data_check(caption_csvs, tmp_path):
    from modeling_visual_med_alpaca import ModelLoadError
    from train_git import main, parse_args

    args = parse_args(cli_args(tmp_path / "no-such-model", tmp_path / "out") + csv_args(caption_csvs))
    with pytest.raises(ModelLoadError, match="pass a local folder holding both"):
        main(*args)
    assert json.loads((tmp_path / "out" / "bad_rows.json").read_text()) == []
