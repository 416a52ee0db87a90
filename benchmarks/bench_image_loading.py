"""Benchmark: load and normalise a 512 x 512 CT slice (target: <= 50 ms on a 2-core CPU machine).

Measures ``medical_image.load_image`` on DICOM bytes, end to end (parse, header checks, decode, modality
LUT, window, 8-bit RGB), side by side with the bare pydicom decode it builds on, in the same run:

    python benchmarks/bench_image_loading.py
    python benchmarks/bench_image_loading.py --repeats 50 --json
    python benchmarks/bench_image_loading.py --config bench.yaml   # any field below, as YAML

Slices: an uncompressed 512 x 512 CT built from pydicom's real ``CT_small.dcm`` (upsampled 4x, its
rescale kept, a 40/400 window added), and pydicom's real 512 x 512 JPEG 2000 CT ``693_J2KI.dcm``.
"""

from __future__ import annotations

import io
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut
from tqdm import tqdm
from transformers import HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from medical_image import load_image  # noqa: E402

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


@dataclass
class BenchmarkArguments:
    repeats: int = field(default=30, metadata={"help": "Timed loads per slice (after 3 warm-up loads)."})
    target_ms: float = field(default=50.0, metadata={"help": "Target for one 512 x 512 CT slice, in ms."})
    json: bool = field(default=False, metadata={"help": "Print one JSON object instead of the table."})


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
    return results


if __name__ == "__main__":
    parser = HfArgumentParser(BenchmarkArguments)
    if len(sys.argv) == 3 and sys.argv[1] == "--config":
        (benchmark_args,) = parser.parse_yaml_file(sys.argv[2])
    else:
        (benchmark_args,) = parser.parse_args_into_dataclasses()
    main(benchmark_args)
