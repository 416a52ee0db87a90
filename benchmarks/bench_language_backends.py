"""Local language model vs the same model behind ``transformers serve``: latency and agreement, side by side.

Builds a tiny bundle, serves its merged language model with ``transformers serve`` on 127.0.0.1, and
answers the same real VQA-RAD questions (text only, so only the language-model stage differs) with the
local backend, the server's completions API, its chat API, and a batch sent with ``max_concurrency`` 1
vs N. Prints seconds per answer, the ratios, and how many remote answers equal the local greedy ones.

    python benchmarks/bench_language_backends.py
    python benchmarks/bench_language_backends.py --num_questions 16 --llama_hidden 256 --llama_layers 4 --json
    python benchmarks/bench_language_backends.py --config bench.yaml
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


@dataclass
class BenchmarkArguments:
    num_questions: int = field(default=8, metadata={"help": "VQA-RAD questions answered by each backend."})
    max_new_tokens: int = field(default=16, metadata={"help": "Answer length."})
    llama_hidden: int = field(default=64, metadata={"help": "Hidden size of the tiny language model."})
    llama_layers: int = field(default=2, metadata={"help": "Layers of the tiny language model."})
    max_concurrency: int = field(default=4, metadata={"help": "Requests in flight for the concurrent batch."})
    json: bool = field(default=False, metadata={"help": "Print the results as one JSON object."})


def _timed(label: str, answer_all) -> tuple[list[str], float]:
    start = time.perf_counter()
    answers = answer_all()
    seconds = time.perf_counter() - start
    print(f"  {label:<34} {seconds:7.2f} s")
    return answers, seconds


def main(args: BenchmarkArguments) -> dict:
    from tqdm import tqdm

    from pipeline_vqa import VisualMedAlpacaPipeline
    from serve_language_model import export_language_model, transformers_serve
    from tiny_bundle import VQA_RAD_DIR, build_bundle

    questions = [q["question"] for q in json.loads((VQA_RAD_DIR / "questions.json").read_text())]
    questions = questions[: args.num_questions]
    model, tokenizer, git_processor, _ = build_bundle(llama_hidden=args.llama_hidden, llama_layers=args.llama_layers)
    vqa = VisualMedAlpacaPipeline(
        model=model, tokenizer=tokenizer, captioner_processor=git_processor, task="visual-med-alpaca", device=-1
    )
    generation = {"max_new_tokens": args.max_new_tokens}
    print(
        f"{len(questions)} questions, {args.max_new_tokens} new tokens, language model "
        f"{sum(p.numel() for p in model.language_model.parameters()) / 1e6:.2f} M parameters"
    )

    def one_at_a_time(backend):
        return lambda: [vqa(q, backend=backend, **generation)["answer"] for q in tqdm(questions, leave=False)]

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = export_language_model(model, tokenizer, Path(tmp) / "med-alpaca-lm")
        with transformers_serve(model_dir, device="cpu") as base_url:
            remote = {"type": "openai", "base_url": base_url, "model": str(model_dir)}
            vqa(questions[0], backend=remote, **generation)  # warm-up: first request, lazy imports, connections
            vqa(questions[0], **generation)
            local, local_s = _timed("local, one at a time", one_at_a_time("local"))
            completions, completions_s = _timed("server completions, one at a time", one_at_a_time(remote))
            chat, chat_s = _timed("server chat, one at a time", one_at_a_time({**remote, "api": "chat"}))
            batch = len(questions)
            sequential, sequential_s = _timed(
                "server batch, max_concurrency=1",
                lambda: [
                    r["answer"]
                    for r in vqa(questions, backend={**remote, "max_concurrency": 1}, batch_size=batch, **generation)
                ],
            )
            concurrent, concurrent_s = _timed(
                f"server batch, max_concurrency={args.max_concurrency}",
                lambda: [
                    r["answer"]
                    for r in vqa(
                        questions,
                        backend={**remote, "max_concurrency": args.max_concurrency},
                        batch_size=batch,
                        **generation,
                    )
                ],
            )

    results = {
        "arguments": asdict(args),
        "seconds_per_answer": {
            "local": local_s / batch,
            "server_completions": completions_s / batch,
            "server_chat": chat_s / batch,
            "server_batch_sequential": sequential_s / batch,
            "server_batch_concurrent": concurrent_s / batch,
        },
        "ratios": {
            "server_completions_over_local": completions_s / local_s,
            "server_chat_over_local": chat_s / local_s,
            "concurrent_over_sequential": concurrent_s / sequential_s,
        },
        "answers_equal_to_local": {
            name: sum(a == b for a, b in zip(answers, local, strict=True))
            for name, answers in {
                "server_completions": completions,
                "server_chat": chat,
                "server_batch_sequential": sequential,
                "server_batch_concurrent": concurrent,
            }.items()
        },
        "questions": batch,
    }
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for name, value in results["ratios"].items():
            print(f"  {name:<34} {value:7.2f}x")
        for name, equal in results["answers_equal_to_local"].items():
            print(f"  {name:<34} {equal}/{batch} answers equal to the local greedy ones")
    return results


if __name__ == "__main__":
    from trl import TrlParser

    (benchmark_args,) = TrlParser(BenchmarkArguments).parse_args_and_config()
    main(benchmark_args)
