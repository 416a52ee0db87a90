"""Benchmark: load and normalise a 512 x 512 CT slice (target: <= 50 ms on a 2-core CPU machine), and a
200-slice CT series (targets: <= 1.25x the time of bare pydicom decoding, peak memory <= 1.5x the volume).

Single slices: ``medical_image.load_image`` on DICOM bytes, end to end (parse, header checks, decode, modality
LUT, window, 8-bit RGB), side by side with the bare pydicom decode it builds on, in the same run.

Series: ``medical_series.load_series`` on a folder of 200 separate 512 x 512 CT files under shuffled names
(read every header, check limits, group, order, select the key slices, decode and window them), side by side
with bare ``pydicom.dcmread(f).pixel_array`` over the same files (kept as a volume, as a caller would), once
uncompressed and once RLE Lossless. Peak memory is Python's ``tracemalloc`` peak (numpy reports its buffers to
it) during each load, in runs separate from the timed ones, against the decoded volume's size
(200 x 512 x 512 x 2 bytes):

    python benchmarks/bench_image_loading.py
    python benchmarks/bench_image_loading.py --repeats 50 --json
    python benchmarks/bench_image_loading.py --config bench.yaml   # any field below, as YAML

Slices: an uncompressed 512 x 512 CT built from pydicom's real ``CT_small.dcm`` (upsampled 4x, its
rescale kept, a 40/400 window added), and pydicom's real 512 x 512 JPEG 2000 CT ``693_J2KI.dcm``; the series
repeats the former at 200 positions 2.5 mm apart (``tests/series_factory.py``).
"""

from __future__ import annotations

import io
import json
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # side-by-side timings on a shared machine

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut
from tqdm import tqdm
from transformers import HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from series_factory import series_slices, write_series  # noqa: E402

from medical_image import load_image  # noqa: E402
from medical_series import load_series  # noqa: E402

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


@dataclass
class BenchmarkArguments:
    repeats: int = field(default=30, metadata={"help": "Timed loads per slice (after 3 warm-up loads)."})
    target_ms: float = field(default=50.0, metadata={"help": "Target for one 512 x 512 CT slice, in ms."})
    json: bool = field(default=False, metadata={"help": "Print one JSON object instead of the table."})
    series_length: int = field(default=200, metadata={"help": "Slices of the synthetic CT series."})
    series_repeats: int = field(default=7, metadata={"help": "Timed loads of each series (after one warm-up)."})
    series_time_target: float = field(default=1.25, metadata={"help": "Target: series load / bare pydicom time."})
    series_memory_target: float = field(default=1.5, metadata={"help": "Target: peak memory / decoded volume."})


def uncompressed_ct_slice() -> bytes:
    """A 512 x 512 CT slice (signed 16-bit, rescale slope/intercept, one window) as DICOM bytes."""
    dataset = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    dataset.set_pixel_data(np.kron(dataset.pixel_array, np.ones((4, 4), dtype=np.int16)), "MONOCHROME2", 16)
    dataset.WindowCenter, dataset.WindowWidth = 40, 400
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def bare_pydicom_decode(data: bytes) -> np.ndarray:
    """What load_image adds to: parse and decode with pydicom, apply the modality LUT, nothing else."""
    dataset = pydicom.dcmread(io.BytesIO(data))
    return apply_modality_lut(dataset.pixel_array, dataset)


def bare_pydicom_volume(paths: list[Path]) -> list[np.ndarray]:
    """The baseline: every file decoded by pydicom, nothing else (no ordering, no windowing)."""
    return [pydicom.dcmread(path).pixel_array for path in paths]


def interleaved_seconds(project, project_source, bare, bare_source, repeats: int) -> tuple[float, float]:
    """Median seconds of each, timed alternately (project, bare, project, ...) so both see the same machine load."""
    project(project_source), bare(bare_source)  # warm-up (page cache, imports)
    project_times, bare_times = [], []
    for _ in range(repeats):
        for function, source, timings in ((project, project_source, project_times), (bare, bare_source, bare_times)):
            start = time.perf_counter()
            function(source)
            timings.append(time.perf_counter() - start)
    return statistics.median(project_times), statistics.median(bare_times)


def peak_bytes(function, source) -> int:
    tracemalloc.start()
    try:
        result = function(source)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    del result
    return peak


def series_benchmark(args: BenchmarkArguments) -> dict:
    datasets = series_slices(args.series_length, upsample=4)
    volume_bytes = args.series_length * 512 * 512 * 2
    results = {"slices": args.series_length, "decoded_volume_mb": round(volume_bytes / 2**20, 1), "series": {}}
    with tempfile.TemporaryDirectory() as folder:
        for name, rle in (("ct_series_uncompressed", False), ("ct_series_rle", True)):
            folder_path = Path(folder) / name
            paths = write_series(datasets, folder_path, rle=rle)  # shuffled names
            files = sorted(folder_path.iterdir())
            loaded = load_series(folder_path)
            assert loaded.metadata["series"]["slices"] == args.series_length and not loaded.warnings
            project_s, bare_s = interleaved_seconds(
                load_series, folder_path, bare_pydicom_volume, files, args.series_repeats
            )
            project_peak = peak_bytes(load_series, folder_path)
            bare_peak = peak_bytes(bare_pydicom_volume, files)
            results["series"][name] = {
                "project_s": round(project_s, 3),
                "bare_pydicom_s": round(bare_s, 3),
                "time_ratio": round(project_s / bare_s, 3),
                "meets_time_target": project_s / bare_s <= args.series_time_target,
                "project_peak_mb": round(project_peak / 2**20, 1),
                "bare_peak_mb": round(bare_peak / 2**20, 1),
                "memory_ratio": round(project_peak / volume_bytes, 3),
                "bare_memory_ratio": round(bare_peak / volume_bytes, 3),
                "meets_memory_target": project_peak / volume_bytes <= args.series_memory_target,
                "decoded_slices": len(loaded.metadata["series"]["selected"]),
            }
            del paths
    return results


def print_series(results: dict, args: BenchmarkArguments) -> None:
    print(
        f"\n{results['slices']}-slice 512 x 512 CT series, separate files, shuffled names "
        f"(decoded volume {results['decoded_volume_mb']} MB)"
    )
    print(
        f"{'series':<24} {'project':>9} {'bare pydicom':>13} {'time ratio':>11} "
        f"{'project peak':>13} {'bare peak':>10} {'memory ratio':>13}"
    )
    for name, row in results["series"].items():
        time_verdict = "ok" if row["meets_time_target"] else "SLOW"
        memory_verdict = "ok" if row["meets_memory_target"] else "HIGH"
        print(
            f"{name:<24} {row['project_s']:>7.3f} s {row['bare_pydicom_s']:>11.3f} s {row['time_ratio']:>6.3f}x "
            f"{time_verdict:<4}{row['project_peak_mb']:>10.1f} MB {row['bare_peak_mb']:>7.1f} MB "
            f"{row['memory_ratio']:>8.3f}x {memory_verdict}"
        )
    print(
        f"project: load_series (all headers read, limits, grouping, ordering; the {row['decoded_slices']} key slices "
        "decoded and windowed); bare: dcmread(f).pixel_array for every file. "
        f"Targets: time <= {args.series_time_target:g}x, peak memory (tracemalloc) <= {args.series_memory_target:g}x "
        f"the decoded volume; median of {args.series_repeats} loads."
    )


def median_ms(function, data: bytes, repeats: int, label: str) -> float:
    for _ in range(3):
        function(data)
    timings = []
    for _ in tqdm(range(repeats), desc=label, leave=False, disable=None):
        start = time.perf_counter()
        function(data)
        timings.append((time.perf_counter() - start) * 1000)
    return statistics.median(timings)


def main(args: BenchmarkArguments) -> dict:
    slices = {
        "ct_512_uncompressed": uncompressed_ct_slice(),
        "ct_512_jpeg2000": (PYDICOM_FILES / "693_J2KI.dcm").read_bytes(),
    }
    results = {"target_ms": args.target_ms, "repeats": args.repeats, "slices": {}}
    for name, data in slices.items():
        loaded = load_image(data)
        assert loaded.is_dicom and loaded.image.size == (512, 512)
        load_ms = median_ms(load_image, data, args.repeats, f"load_image {name}")
        bare_ms = median_ms(bare_pydicom_decode, data, args.repeats, f"pydicom {name}")
        results["slices"][name] = {
            "load_image_ms": round(load_ms, 2),
            "bare_pydicom_ms": round(bare_ms, 2),
            "overhead_ratio": round(load_ms / bare_ms, 2),
            "target_ratio": round(load_ms / args.target_ms, 3),
            "meets_target": load_ms <= args.target_ms,
        }
    results["series"] = series_benchmark(args)
    if args.json:
        print(json.dumps(results))
    else:
        print(f"{'slice':<22} {'load_image':>11} {'bare pydicom':>13} {'ratio':>6} {'vs target':>10}")
        for name, row in results["slices"].items():
            verdict = "ok" if row["meets_target"] else "SLOW"
            print(
                f"{name:<22} {row['load_image_ms']:>8.2f} ms {row['bare_pydicom_ms']:>10.2f} ms "
                f"{row['overhead_ratio']:>5.2f}x {row['target_ratio']:>6.3f} {verdict}"
            )
        print(f"target: <= {args.target_ms:g} ms per 512 x 512 CT slice; median of {args.repeats} loads")
        print_series(results["series"], args)
    return results


if __name__ == "__main__":
    parser = HfArgumentParser(BenchmarkArguments)
    if len(sys.argv) == 3 and sys.argv[1] == "--config":
        (benchmark_args,) = parser.parse_yaml_file(sys.argv[2])
    else:
        (benchmark_args,) = parser.parse_args_into_dataclasses()
    main(benchmark_args)
