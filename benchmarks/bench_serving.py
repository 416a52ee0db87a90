"""Serving throughput: the Ray Serve app (serve.py) with dynamic batching on vs ``max_batch_size=1``, and the
in-process pipeline at the same batch size, on one bounded workload, measured side by side in one run.

Workload: ``--clients`` concurrent clients (the real `openai` client, one thread each) x ``--requests_per_client``
chat requests, each a different VQA-RAD image from ``data/vqa_rad_dev`` with one of its questions, greedy,
``max_tokens=--answer_tokens``. The bundle is bench_throughput.py's small-but-realistic one (GIT 256x4 at 224 px,
LLaMA 512x4 with a 32k vocabulary, fixed seed). The intermediate-text cache is off everywhere (every request runs
its expert), so no side profits from an earlier one. One embedded Ray on this machine; the two server settings
are the same deployment with only ``max_batch_size`` changed (Ray reconfigures the stages in place).

Prints throughput (requests/s), p50/p99 client latency, the ratios batching-on / batching-off (target >= 2x) and
server / in-process at the same batch size (target >= 0.8x), and whether the greedy answers agree across all three.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_serving.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_serving.py --clients 16 --requests_per_client 4 --json
"""

import json
import os
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))


@dataclass
class ServingBenchmarkArguments:
    clients: int = field(default=16, metadata={"help": "concurrent clients"})
    requests_per_client: int = field(default=4, metadata={"help": "requests each client sends, one after another"})
    max_batch_size: int = field(default=8, metadata={"help": "batch size of the batched server and of the pipeline"})
    batch_wait_timeout_s: float = field(default=0.05, metadata={"help": "@serve.batch wait to fill a batch"})
    answer_tokens: int = field(default=32, metadata={"help": "max_tokens of each answer"})
    num_cpus: int = field(default=2, metadata={"help": "logical CPUs of the embedded Ray"})
    seed: int = field(default=0)
    json: bool = field(default=False, metadata={"help": "print one JSON object instead of a table"})


def workload(count: int) -> list[tuple[Path, str]]:
    from bench_throughput import vqa_rad_inputs

    images, questions = vqa_rad_inputs()
    if len(images) < count:  # fewer images than requests: questions of the same image differ
        pairs = [(path, question) for path in images for question in questions[path.name]]
    else:
        pairs = [(path, questions[path.name][0]) for path in images]
    return pairs[:count]


def data_uri(path: Path) -> str:
    import base64

    return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()


def run_clients(base_url: str, model: str, pairs, clients: int, answer_tokens: int) -> dict:
    """``clients`` threads, each sending its share of ``pairs`` one after another; wall time and latencies."""
    import openai

    per_client = [pairs[i::clients] for i in range(clients)]
    answers: dict[int, str] = {}
    latencies: list[float] = []

    def client_loop(index: int) -> None:
        client = openai.OpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600)
        for number, (path, question) in enumerate(per_client[index]):
            content = [{"type": "image_url", "image_url": {"url": data_uri(path)}}, {"type": "text", "text": question}]
            start = time.perf_counter()
            completion = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": content}], max_tokens=answer_tokens
            )
            latencies.append(time.perf_counter() - start)
            answers[number * clients + index] = completion.choices[0].message.content

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(client_loop, range(clients)))
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "throughput_rps": len(pairs) / seconds,
        "p50_s": statistics.median(latencies),
        "p99_s": statistics.quantiles(latencies, n=100)[98] if len(latencies) > 1 else latencies[0],
        "answers": [answers[i] for i in range(len(pairs))],
    }


def batch_sizes(base_url: str) -> dict:
    import httpx

    return httpx.get(f"{base_url}/stats", timeout=30).json()


def main(args: ServingBenchmarkArguments) -> dict:
    import torch
    from bench_throughput import build_realistic_bundle
    from ray import serve as ray_serve
    from transformers import pipeline

    import serve

    torch.set_num_threads(1)
    workdir = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    bundle = build_realistic_bundle(args.seed, workdir / "bundle")
    pairs = workload(args.clients * args.requests_per_client)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = serve.ServeArguments(
        bundle=str(bundle),
        port=port,
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_timeout_s,
        max_ongoing_requests=max(32, args.clients),
        max_queued_requests=4 * args.clients,
        intermediate_cache_size=0,
        max_tokens=max(512, args.answer_tokens),
    )
    base_url = f"http://127.0.0.1:{port}"
    results: dict[str, dict] = {}
    serve.start_ray(args.num_cpus, tempfile.mkdtemp(prefix="vma-ray-", dir="/tmp"))
    try:
        for name, batch in (("server_batched", args.max_batch_size), ("server_batch1", 1)):
            serve.deploy(replace(settings, max_batch_size=batch))
            run_clients(f"{base_url}/v1", "bundle", pairs[: args.clients], args.clients, args.answer_tokens)  # warm-up
            before = batch_sizes(base_url)
            results[name] = run_clients(f"{base_url}/v1", "bundle", pairs, args.clients, args.answer_tokens)
            after = batch_sizes(base_url)
            sizes = after["language_batch_sizes"][len(before["language_batch_sizes"]) :]
            results[name]["mean_language_batch"] = sum(sizes) / max(1, len(sizes))
            sizes = after["expert_batch_sizes"][len(before["expert_batch_sizes"]) :]
            results[name]["mean_expert_batch"] = sum(sizes) / max(1, len(sizes))
        ray_serve.delete(serve.APP_NAME)
    finally:
        ray_serve.shutdown()
        import ray

        ray.shutdown()

    # The in-process pipeline, same requests, same greedy settings, batches of the same size (images as bytes,
    # read inside the timing as the server reads its data: URIs).
    vqa = pipeline(model=str(bundle), trust_remote_code=True, intermediate_cache_size=0)
    requests = [{"image": path.read_bytes(), "question": question} for path, question in pairs]
    vqa(requests[:2], batch_size=2, max_new_tokens=args.answer_tokens)  # warm-up
    start = time.perf_counter()
    records = vqa(requests, batch_size=args.max_batch_size, max_new_tokens=args.answer_tokens)
    seconds = time.perf_counter() - start
    results["in_process"] = {
        "seconds": seconds,
        "throughput_rps": len(pairs) / seconds,
        "answers": [record["answer"] for record in records],
    }
    answers_agree = (
        results["server_batched"]["answers"] == results["server_batch1"]["answers"] == results["in_process"]["answers"]
    )
    for result in results.values():
        result.pop("answers")
    return {
        "workload": {
            "clients": args.clients,
            "requests": len(pairs),
            "answer_tokens": args.answer_tokens,
            "max_batch_size": args.max_batch_size,
            "batch_wait_timeout_s": args.batch_wait_timeout_s,
            "threads_per_replica": 1,
        },
        "results": results,
        "batched_vs_batch1": results["server_batched"]["throughput_rps"] / results["server_batch1"]["throughput_rps"],
        "server_vs_in_process": results["server_batched"]["throughput_rps"] / results["in_process"]["throughput_rps"],
        "greedy_answers_agree": answers_agree,
    }


def print_table(report: dict) -> None:
    workload_ = report["workload"]
    print(
        f"{workload_['clients']} clients, {workload_['requests']} requests (VQA-RAD image + question), "
        f"max_tokens={workload_['answer_tokens']}, batch size {workload_['max_batch_size']}, one thread per replica"
    )
    print(f"{'side':<16}{'req/s':>8}{'p50 s':>8}{'p99 s':>8}{'mean batch (expert/LM)':>26}")
    for name, result in report["results"].items():
        batches = (
            f"{result['mean_expert_batch']:.1f} / {result['mean_language_batch']:.1f}"
            if "mean_language_batch" in result
            else "-"
        )
        p50 = f"{result['p50_s']:.2f}" if "p50_s" in result else "-"
        p99 = f"{result['p99_s']:.2f}" if "p99_s" in result else "-"
        print(f"{name:<16}{result['throughput_rps']:>8.2f}{p50:>8}{p99:>8}{batches:>26}")
    print(f"batching on / off: {report['batched_vs_batch1']:.2f}x (target >= 2x)")
    ratio = report["server_vs_in_process"]
    print(f"server / in-process at batch {workload_['max_batch_size']}: {ratio:.2f}x (target >= 0.8x)")
    print(f"greedy answers identical across the three: {report['greedy_answers_agree']}")


if __name__ == "__main__":
    from transformers import HfArgumentParser

    (arguments,) = HfArgumentParser(ServingBenchmarkArguments).parse_args_into_dataclasses()
    report = main(arguments)
    print(json.dumps(report, indent=2) if arguments.json else "", end="")
    if not arguments.json:
        print_table(report)
