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
paths are relative to the input file). Each answered row becomes one JSON line in ``--output`` carrying its
``id``, ``question`` and ``image`` (as the input names it) beside the answer record; a rerun skips the rows
already answered there, so an interrupted run resumes. Rows with bad input (a missing image, no question, a
JSONL line that is not a JSON object) are written as ``{"id", "question", "image", "error", "error_type"}``
lines; the next run retries them and replaces their error lines, so each id appears once.

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

PROG = "visual-med-alpaca"
EXAMPLES = {
    "ask": [
        'ask --model org/visual-med-alpaca --image chest.png "What abnormality is seen?"',
        'ask --model build/demo_bundle "What are the chemicals that treat hair loss?"',
        'ask --model build/demo_bundle --image scan.dcm --show-prompt --json "Which organ is shown?"',
    ],
    "caption": ["caption --model build/demo_bundle chest.png", "caption --model build/demo_bundle --json scan.dcm"],
    "batch": [
        "batch --model build/demo_bundle --output answers.jsonl questions.jsonl",
        "batch --model build/demo_bundle --output answers.jsonl questions.csv",
        'batch --model build/demo_bundle --question "What is seen?" --output out.jsonl images/',
    ],
}
FOOTER = """exit codes: 0 done, 2 bad input, 3 model could not be loaded, 1 other failure.
Research use only; not for clinical decisions."""


def epilog(*commands: str) -> str:
    """The examples of ``commands`` as full command lines (the same text in the main and subcommand help)."""
    lines = [f"  {PROG} {example}" for command in commands for example in EXAMPLES[command]]
    return "examples:\n" + "\n".join(lines) + "\n\n" + FOOTER


class CliInputError(Exception):
    """Bad command-line input found before the model is involved (a missing batch file, a bad CSV)."""

    exit_code = EXIT_BAD_INPUT


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Biomedical visual question answering: a visual expert reads the image, Med-Alpaca answers.",
        epilog=epilog("ask", "caption", "batch"),
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
        "ask", parents=[model_options], help="Answer one question, optionally about an image.", epilog=epilog("ask")
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
        "caption", parents=[model_options], help="Print only the visual expert's text.", epilog=epilog("caption")
    )
    caption.formatter_class = argparse.RawDescriptionHelpFormatter
    caption.add_argument("image", help="PNG, JPEG or DICOM file, or a folder or .zip of one DICOM series.")

    batch = commands.add_parser(
        "batch",
        parents=[model_options],
        help="Answer a folder, CSV or JSONL of (image, question) rows.",
        epilog=epilog("batch"),
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
    """The pipeline, loaded through trust_remote_code; a failure becomes a one-line ``HubLoadError`` (exit 3).

    The message names the cause (offline mode, Hub unreachable, no such repository, gated or private, no such
    revision, an incomplete folder): see ``hub_errors.py``.
    """
    from hub_errors import hub_load_error
    from quiet_libraries import quiet_library_noise

    quiet_library_noise()  # before bitsandbytes is imported: it logs one of them at import
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
        raise hub_load_error(error, model, revision) from None


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


class BadRow(dict):
    """A batch row that cannot be asked at all (a line that is not a JSON object): written as an error line."""


def read_batch_rows(source: Path, question: str | None) -> list[dict]:
    """``{"id", "image", "question", "reference"}`` rows of a folder, CSV or JSONL file; ids unique and stable.

    ``reference`` is the image as the input names it (the record carries it); ``image`` is the path to open.
    A JSONL line that is not a JSON object becomes a ``BadRow`` (an error line in the output), not an abort.
    Row ids default to the row's position among the non-empty lines, so fixing one line keeps the others' ids.
    """
    if source.is_dir():
        if not question:
            raise CliInputError("A folder needs --question (the question asked about every image).")
        images = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        return [{"id": p.name, "image": str(p), "reference": p.name, "question": question} for p in images]
    if not source.is_file():
        raise CliInputError("The batch input does not exist; pass a folder, a .csv or a .jsonl file.")
    raw_rows: list = []
    if source.suffix.lower() == ".csv":
        with source.open(newline="", encoding="utf-8") as handle:
            raw_rows = list(csv.DictReader(handle))
    elif source.suffix.lower() in {".jsonl", ".json"}:
        lines = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
        for line_number, line in enumerate(lines, start=1):
            try:
                raw_rows.append(json.loads(line))
            except json.JSONDecodeError:
                raw_rows.append(BadRow(reason=f"Row {line_number} of the JSONL input is not valid JSON."))
    else:
        raise CliInputError("The batch input must be a folder, a .csv or a .jsonl file.")
    rows = []
    for index, raw in enumerate(raw_rows):
        if isinstance(raw, BadRow) or not isinstance(raw, dict):
            reason = raw["reason"] if isinstance(raw, BadRow) else None
            reason = reason or f"Row {index + 1} of the batch input is not an object with image/question."
            rows.append(BadRow(id=str(index), image=None, reference=None, question=None, reason=reason))
            continue
        reference = raw.get("image") or None
        image = reference
        if image and not Path(image).is_absolute():
            image = str(source.parent / image)
        row_question = raw.get("question") or question
        rows.append(
            {"id": str(raw.get("id") or index), "image": image, "reference": reference, "question": row_question}
        )
    ids = [row["id"] for row in rows]
    if len(set(ids)) != len(ids):
        raise CliInputError("The batch input has duplicate ids; each row needs a unique 'id' to be resumable.")
    return rows


def _output_records(output: Path) -> list[tuple[str, dict | None]]:
    """Each line of ``output`` with its parsed record (``None`` for a line that is not a JSON object)."""
    records = []
    for line in output.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        records.append((line, record if isinstance(record, dict) else None))
    return records


def answered_ids(output: Path) -> set[str]:
    """Ids already answered in ``output`` (error lines are retried; a torn last line is ignored)."""
    if not output.exists():
        return set()
    return {str(r["id"]) for _, r in _output_records(output) if r is not None and "answer" in r and "id" in r}


def prepare_output(output: Path, retried_ids: set[str]) -> None:
    """Make ``output`` ready for appending: drop the error lines of the rows about to be retried (so each id
    appears once) and an unfinished last line (a run killed mid-write). Rewritten atomically; answers are kept."""
    if not output.exists():
        return
    kept = []
    for line, record in _output_records(output):
        if not line.endswith("\n"):
            continue  # torn last line
        if record is not None and "error" in record and str(record.get("id")) in retried_ids:
            continue
        kept.append(line)
    temporary = output.with_name(output.name + ".tmp")
    temporary.write_text("".join(kept), encoding="utf-8")
    os.replace(temporary, output)


def _chunks(rows: list[dict], size: int) -> Iterator[list[dict]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


URL_REFUSED = (
    "Image URLs are not fetched by this command: download the image first (e.g. curl -o image.png URL) "
    "and pass its file path."
)


def error_message(error: Exception) -> str:
    """The one-line message for one of our typed errors, worded for this command line."""
    if type(error).__name__ == "ImageURLNotAllowedError":
        return URL_REFUSED  # the library's text names a Python keyword (allow_urls) this command does not have
    return " ".join(str(error).split())


def _error_fields(error: Exception) -> dict:
    return {"error": error_message(error), "error_type": type(error).__name__}


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
    askable = [row for row in pending if not isinstance(row, BadRow)]
    vqa = load_pipeline(args.model, args.revision, args.load_in_8bit) if askable else None
    options = {"return_prompt": args.show_prompt, **generation_options(args)}
    output.parent.mkdir(parents=True, exist_ok=True)
    prepare_output(output, {row["id"] for row in pending})
    failed = 0

    def write(sink, row: dict, result: dict) -> None:
        # The record says which row it answers: id, question and the image as the input named it.
        provenance = {"id": row["id"], "question": row["question"], "image": row["reference"]}
        sink.write(json.dumps({**provenance, **result}, ensure_ascii=False) + "\n")

    with output.open("a", encoding="utf-8") as sink, tqdm(total=len(pending), desc="answering", unit="row") as bar:
        for row in pending:
            if isinstance(row, BadRow):
                failed += 1
                write(sink, row, {"error": row["reason"], "error_type": "BadBatchRowError"})
                bar.update(1)
        sink.flush()
        for chunk in _chunks(askable, args.batch_size):
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
                        results.append(_error_fields(row_error))
            for row, result in zip(chunk, results, strict=True):
                failed += "error" in result
                write(sink, row, result)
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
        print(f"error: {error_message(error)}", file=sys.stderr)
        return code if code in (EXIT_BAD_INPUT, EXIT_MODEL_LOAD) else EXIT_ERROR


def console_main() -> None:
    """Entry point of the ``visual-med-alpaca`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    console_main()
