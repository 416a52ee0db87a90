"""Command-line interface of Visual Med-Alpaca: ask about an image, caption it, or answer a whole batch.

Installed as ``visual-med-alpaca`` (``pip install .``); from a checkout run ``python visual_med_alpaca_cli.py``::

    visual-med-alpaca ask --model org/visual-med-alpaca --image chest.png "What abnormality is seen?"
    visual-med-alpaca ask --model build/demo_bundle "What are the chemicals that treat hair loss?"   # no image
    visual-med-alpaca ask --model build/demo_bundle --image scan.dcm --show-prompt --json "Which organ is shown?"
    visual-med-alpaca caption --model build/demo_bundle chest.png
    visual-med-alpaca batch --model build/demo_bundle --output answers.jsonl questions.jsonl
    visual-med-alpaca batch --model build/demo_bundle --question "What abnormality is seen?" --output out.jsonl images/

Batch input: a folder of images (one ``--question`` for all), a CSV with ``image,question`` columns, or a
JSONL file of ``{"image": ..., "question": ...}`` rows (an ``id`` column/key is optional; relative image
paths are relative to the input file). Each answered row becomes one JSON line in ``--output``; a rerun
skips the rows already answered there, so an interrupted run resumes. Rows with bad input are written as
``{"id", "error", "error_type"}`` lines and retried by the next run.

Exit codes: 0 done; 2 bad input (question, image, options, batch file; batch: some rows were bad);
3 the model could not be loaded; 1 anything else. Errors are one line on stderr.

Research use only: every answer carries the project's disclaimer.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_MODEL_LOAD = 0, 1, 2, 3
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}

EPILOG = """examples:
  %(prog)s ask --model org/visual-med-alpaca --image chest.png "What abnormality is seen?"
  %(prog)s ask --model build/demo_bundle "What are the chemicals that treat hair loss?"
  %(prog)s caption --model build/demo_bundle scan.dcm
  %(prog)s batch --model build/demo_bundle --output answers.jsonl questions.csv

exit codes: 0 done, 2 bad input, 3 model could not be loaded, 1 other failure.
Research use only; not for clinical decisions."""


class CliInputError(Exception):
    """Bad command-line input found before the model is involved (a missing batch file, a bad CSV)."""

    exit_code = EXIT_BAD_INPUT


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visual-med-alpaca",
        description="Biomedical visual question answering: a visual expert reads the image, Med-Alpaca answers.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model_options = argparse.ArgumentParser(add_help=False)
    model_options.add_argument("--model", required=True, help="Hub repository id or local bundle folder.")
    model_options.add_argument("--revision", default=None, help="Branch, tag or commit of the Hub repository.")
    model_options.add_argument(
        "--load-in-8bit", action="store_true", help="Quantise the language model to 8 bit (bitsandbytes)."
    )
    model_options.add_argument(
        "--expert", choices=["radiology", "chart", "none"], default=None, help="Force a visual expert."
    )
    model_options.add_argument("--json", action="store_true", help="Print the full record(s) as JSON.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{ask,caption,batch}")

    ask = commands.add_parser(
        "ask", parents=[model_options], help="Answer one question, optionally about an image.", epilog=EPILOG
    )
    ask.formatter_class = argparse.RawDescriptionHelpFormatter
    ask.add_argument("question", help="The question.")
    ask.add_argument(
        "--image",
        default=None,
        help="PNG, JPEG or DICOM file, or a DICOM series: a folder or .zip of its files (optional).",
    )
    ask.add_argument("--show-prompt", action="store_true", help="Also print the exact prompt the model was given.")
    ask.add_argument("--max-new-tokens", type=int, default=None, help="Answer length limit.")
    ask.add_argument(
        "--series-mode",
        choices=["key_slices", "middle", "montage"],
        default=None,
        help="How a series is read: evenly spaced key slices one by one (default), the middle slice, or a montage.",
    )
    ask.add_argument("--series-slices", type=int, default=None, help="Key slices read from a series (default 5).")

    caption = commands.add_parser(
        "caption", parents=[model_options], help="Print only the visual expert's text.", epilog=EPILOG
    )
    caption.formatter_class = argparse.RawDescriptionHelpFormatter
    caption.add_argument("image", help="PNG, JPEG or DICOM file, or a folder or .zip of one DICOM series.")

    batch = commands.add_parser(
        "batch", parents=[model_options], help="Answer a folder, CSV or JSONL of (image, question) rows.", epilog=EPILOG
    )
    batch.formatter_class = argparse.RawDescriptionHelpFormatter
    batch.add_argument("input", help="Folder of images, .csv (image,question) or .jsonl file.")
    batch.add_argument("--output", required=True, help="JSONL file of records; existing rows are skipped.")
    batch.add_argument("--question", default=None, help="The question for every image of a folder.")
    batch.add_argument("--batch-size", type=int, default=8, help="Rows per model call.")
    batch.add_argument("--show-prompt", action="store_true", help="Include the prompt in each record.")
    batch.add_argument("--max-new-tokens", type=int, default=None, help="Answer length limit.")
    return parser


def load_pipeline(model: str, revision: str | None = None, load_in_8bit: bool = False):
    """The pipeline, loaded through trust_remote_code; any failure becomes a ``ModelLoadError``-like exit 3."""
    from transformers import pipeline
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # stderr is for our one-line errors (and the batch progress bar)
    hf_logging.disable_progress_bar()
    model_kwargs = {"load_in_8bit": True} if load_in_8bit else {}
    try:
        return pipeline(model=model, revision=revision, trust_remote_code=True, model_kwargs=model_kwargs)
    except Exception as error:
        if getattr(error, "exit_code", None) == EXIT_MODEL_LOAD:
            raise
        raise ModelLoadFailure(
            f"Could not load the model '{model}' ({type(error).__name__}). Check the Hub id or folder, "
            "--revision, and that the bundle was saved completely."
        ) from None


class ModelLoadFailure(Exception):
    """Loading failed before the project's own ``ModelLoadError`` could be raised (e.g. a wrong folder)."""

    exit_code = EXIT_MODEL_LOAD


def generation_options(args) -> dict:
    options = {}
    if getattr(args, "max_new_tokens", None) is not None:
        options["max_new_tokens"] = args.max_new_tokens
    return options


def series_options(args) -> dict:
    """How a DICOM series given as --image is read (the pipeline's config defaults otherwise)."""
    return {name: getattr(args, name) for name in ("series_mode", "series_slices") if getattr(args, name) is not None}


def run_ask(args, out=None) -> int:
    out = out or sys.stdout
    vqa = load_pipeline(args.model, args.revision, args.load_in_8bit)
    request = {"question": args.question, "image": args.image, "expert": args.expert}
    options = {"return_prompt": True, **generation_options(args), **series_options(args)}
    if args.json:
        record = vqa(request, **options)
        if not args.show_prompt:
            record.pop("prompt", None)
        print(json.dumps(record, ensure_ascii=False), file=out)
        return EXIT_OK
    stream = vqa.stream(request, **options)
    # The expert stage runs before the first piece; the answer then appears as it is generated.
    first = next(stream)
    record = first if isinstance(first, dict) else None
    pieces = [] if record is not None else [first]
    if record is None:
        print("Answer: ", end="", file=out, flush=True)
        print(first, end="", file=out, flush=True)
        for piece in stream:
            if isinstance(piece, dict):
                record = piece
            else:
                pieces.append(piece)
                print(piece, end="", file=out, flush=True)
        print(file=out)
    else:
        print(f"Answer: {record['answer']}", file=out)
    print(f"Expert: {record['expert'] or 'none (no image)'}", file=out)
    if record["intermediate_text"] is not None:
        print(f"Intermediate text: {record['intermediate_text']}", file=out)
    for warning in record["warnings"]:
        print(f"Warning: {warning}", file=out)
    if args.show_prompt:
        print(f"Prompt:\n{record['prompt']}", file=out)
    print(f"Disclaimer: {record['disclaimer']}", file=out)
    return EXIT_OK


def run_caption(args, out=None) -> int:
    out = out or sys.stdout
    vqa = load_pipeline(args.model, args.revision, args.load_in_8bit)
    description = vqa.describe_image(args.image, expert=args.expert)
    if args.json:
        print(json.dumps(description, ensure_ascii=False), file=out)
    else:
        print(description["intermediate_text"] or "", file=out)
    return EXIT_OK


def read_batch_rows(source: Path, question: str | None) -> list[dict]:
    """``{"id", "image", "question"}`` rows of a folder, CSV or JSONL file; ids are unique and stable."""
    if source.is_dir():
        if not question:
            raise CliInputError("A folder needs --question (the question asked about every image).")
        images = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        return [{"id": p.name, "image": str(p), "question": question} for p in images]
    if not source.is_file():
        raise CliInputError("The batch input does not exist; pass a folder, a .csv or a .jsonl file.")
    if source.suffix.lower() == ".csv":
        with source.open(newline="", encoding="utf-8") as handle:
            raw_rows = list(csv.DictReader(handle))
    elif source.suffix.lower() in {".jsonl", ".json"}:
        raw_rows = []
        for line_number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                raw_rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise CliInputError(f"Line {line_number} of the JSONL input is not valid JSON.") from None
    else:
        raise CliInputError("The batch input must be a folder, a .csv or a .jsonl file.")
    rows = []
    for index, raw in enumerate(raw_rows):
        if not isinstance(raw, dict):
            raise CliInputError(f"Row {index + 1} of the batch input is not an object with image/question.")
        image = raw.get("image") or None
        if image and not Path(image).is_absolute():
            image = str(source.parent / image)
        row_question = raw.get("question") or question
        rows.append({"id": str(raw.get("id") or index), "image": image, "question": row_question})
    ids = [row["id"] for row in rows]
    if len(set(ids)) != len(ids):
        raise CliInputError("The batch input has duplicate ids; each row needs a unique 'id' to be resumable.")
    return rows


def answered_ids(output: Path) -> set[str]:
    """Ids already answered in ``output`` (error lines are retried; a torn last line is ignored)."""
    done = set()
    if output.exists():
        for line in output.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "answer" in record and "id" in record:
                done.add(str(record["id"]))
    return done


def drop_torn_last_line(output: Path) -> None:
    """Cut an unfinished last line (a run killed mid-write) so appended records start on their own line."""
    if not output.exists():
        return
    data = output.read_bytes()
    if data and not data.endswith(b"\n"):
        with output.open("r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)


def _chunks(rows: list[dict], size: int) -> Iterator[list[dict]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def run_batch(args, out=None) -> int:
    out = out or sys.stdout
    from tqdm.auto import tqdm

    if args.batch_size < 1:
        raise CliInputError("--batch-size must be at least 1.")
    rows = read_batch_rows(Path(args.input), args.question)
    output = Path(args.output)
    done = answered_ids(output)
    pending = [row for row in rows if row["id"] not in done]
    if not pending:
        print(f"All {len(rows)} rows are already answered in {output}.", file=out)
        return EXIT_OK
    vqa = load_pipeline(args.model, args.revision, args.load_in_8bit)
    options = {"return_prompt": args.show_prompt, **generation_options(args)}
    output.parent.mkdir(parents=True, exist_ok=True)
    drop_torn_last_line(output)
    failed = 0
    with output.open("a", encoding="utf-8") as sink, tqdm(total=len(pending), desc="answering", unit="row") as bar:
        for chunk in _chunks(pending, args.batch_size):
            requests = [{"image": r["image"], "question": r["question"], "expert": args.expert} for r in chunk]
            try:
                results = vqa(requests, batch_size=len(requests), **options)
            except Exception as error:
                if getattr(error, "exit_code", None) != EXIT_BAD_INPUT:
                    raise
                results = []  # one bad row: answer the chunk row by row so only that row fails
                for request in requests:
                    try:
                        results.append(vqa(request, **options))
                    except Exception as row_error:
                        if getattr(row_error, "exit_code", None) != EXIT_BAD_INPUT:
                            raise
                        results.append({"error": str(row_error), "error_type": type(row_error).__name__})
            for row, result in zip(chunk, results, strict=True):
                failed += "error" in result
                sink.write(json.dumps({"id": row["id"], **result}, ensure_ascii=False) + "\n")
            sink.flush()
            bar.update(len(chunk))
    print(f"Wrote {len(pending) - failed} answers to {output} ({len(done)} were already there).", file=out)
    if failed:
        print(f"error: {failed} row(s) had bad input; see their 'error' lines in {output}.", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_OK


COMMANDS = {"ask": run_ask, "caption": run_caption, "batch": run_batch}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("error: interrupted; a batch rerun resumes where it stopped.", file=sys.stderr)
        return EXIT_ERROR
    except Exception as error:
        # Remote code loads its own copy of each error class: match the code by attribute, not by class.
        code = getattr(error, "exit_code", None)
        if code is None:  # not one of ours: its message may quote inputs, so name only its type
            print(f"error: unexpected {type(error).__name__}; rerun in Python for details.", file=sys.stderr)
            return EXIT_ERROR
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return code if code in (EXIT_BAD_INPUT, EXIT_MODEL_LOAD) else EXIT_ERROR


def console_main() -> None:
    """Entry point of the ``visual-med-alpaca`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    console_main()
