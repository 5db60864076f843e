"""Preprocessing cost per input kind against the model's own compute, on one core.

For every sample (the six small ones and the detector-sized ones of `inferq.producers.samples`), times:
  full     decode at full resolution, present, fit and normalise (`read_picture` without a spec, then
           `to_model_input`)
  reduced  what workers and `inferq predict` run (`preprocess`): JPEG 2000 resolution levels and JPEG DCT
           scaling where they cover the model's input
and the model's forward pass on one image (DenseNet-121 for `chest-xray`), all pinned to one CPU core.
Prints the median of several runs, the reduced time as a share of the model's compute (target: <= 25%), and
how far the reduced tensor is from the full one (max |difference| in picture units, i.e. of [0, 1]). For a PNG it
also times the floor under any decoder: inflating the image data (zlib), which PNG has no way to skip or reduce.

    .venv/bin/python scripts/bench_preprocess.py [--model chest-xray] [--runs 7] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path

# The script runs from a checkout without the project installed as well: put the repo root first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from inferq.config import Settings
from inferq.producers.samples import write_large_samples, write_samples
from inferq.protocol.media import png_chunks
from inferq.protocol.registry import ImageInput, load_registry
from inferq.workers.architectures import build_architecture
from inferq.workers.imaging import preprocess, read_picture, to_model_input

TARGET_SHARE = 0.25


def _median_ms(work: Callable[[], object], runs: int) -> float:
    work()  # warm caches and lazy imports
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def _full(data: bytes, spec: ImageInput, limit: int) -> np.ndarray:
    return to_model_input(read_picture(data, max_image_pixels=limit), spec)


def _png_image_data(data: bytes) -> bytes:
    """The concatenated IDAT chunks of a PNG: one zlib stream of every (filtered) row."""
    return b"".join(body for kind, body in png_chunks(data) if kind == b"IDAT")


def _model_ms(spec_name: str, runs: int) -> float:
    spec = load_registry(Settings().registry_path).get_model(spec_name)
    assert isinstance(spec.input, ImageInput)
    module = build_architecture(spec).eval()
    batch = torch.zeros((1, spec.input.channels, spec.input.height, spec.input.width))
    with torch.inference_mode():
        return _median_ms(lambda: module(batch), runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="chest-xray")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="the small samples only, one run each: a smoke run")
    args = parser.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.set_num_threads(1)
    settings = Settings()
    spec = load_registry(settings.registry_path).get_model(args.model)
    assert isinstance(spec.input, ImageInput), "preprocessing is measured for image models"
    image_spec = spec.input
    limit = settings.max_image_pixels
    runs = 1 if args.quick else args.runs
    model_ms = _model_ms(args.model, 1 if args.quick else max(3, runs // 2))
    print(f"model {args.model}: forward pass on one image, one core: {model_ms:.1f} ms")
    print(f"{'input kind':34} {'size':>11} {'full ms':>8} {'reduced ms':>10} {'x model':>8} {'max |d|':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_samples(Path(tmp) / "small")
        if not args.quick:
            paths += write_large_samples(Path(tmp) / "large")
        for path in paths:
            data = path.read_bytes()
            full_tensor = _full(data, image_spec, limit)
            reduced_tensor, info = preprocess(data, image_spec, max_image_pixels=limit)
            std = np.asarray(image_spec.std).reshape(-1, 1, 1)
            difference = float(np.abs((reduced_tensor - full_tensor) * std).max())
            full_ms = _median_ms(partial(_full, data, image_spec, limit), runs)
            reduced_ms = _median_ms(partial(preprocess, data, image_spec, max_image_pixels=limit), runs)
            share = reduced_ms / model_ms
            flag = "" if share <= TARGET_SHARE else "  over target"
            size = f"{info.rows}x{info.columns}"
            print(f"{path.name:34} {size:>11} {full_ms:8.1f} {reduced_ms:10.1f} {share:8.2f} {difference:8.4f}{flag}")
            if path.suffix == ".png":
                image_data = _png_image_data(data)
                inflate_ms = _median_ms(partial(zlib.decompress, image_data), runs)
                floor = f"{inflate_ms:10.1f} {inflate_ms / model_ms:8.2f}"
                print(f"  {'its inflate alone (zlib)':32} {'':>11} {'':>8} {floor}")
    print(f"target: reduced preprocessing <= {TARGET_SHARE:.0%} of the model's compute")


if __name__ == "__main__":
    main()
