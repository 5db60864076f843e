"""Running one model on one job's input: decode, run, shape the result. Plain functions, no broker: the Celery
task and `inferq predict` both call `ModelRunner.run`, so a served result and an in-process one are the same.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from inferq.config import Settings
from inferq.protocol.codec import encode_tensor, tensor_from_bytes
from inferq.protocol.errors import InferenceError
from inferq.protocol.media import ImageInfo
from inferq.protocol.registry import ImageInput, ModelSpec
from inferq.workers.imaging import preprocess
from inferq.workers.weights import load_model

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
UNTRAINED_WARNING = "untrained weights: these numbers carry no medical or financial meaning"


class ModelRunner:
    """One loaded model on one device; `infer` takes and returns numpy batches."""

    def __init__(self, spec: ModelSpec, module: torch.nn.Module, device: torch.device, *, max_image_pixels: int):
        self.spec = spec
        self._module = module
        self._device = device
        self._max_image_pixels = max_image_pixels

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Post-head outputs (probabilities for sigmoid/softmax heads), shape (N, outputs), float32."""
        with torch.inference_mode():
            logits = self._module(self._to_device(batch))
            if not isinstance(logits, torch.Tensor):
                raise InferenceError(f"model {self.spec.name!r} returned {type(logits).__name__}, not a tensor")
            outputs = _apply_head(self.spec.head, logits.float()).cpu().numpy()
        return _checked_outputs(self.spec, batch, outputs)

    def _to_device(self, batch: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(batch))
        if self._device.type != "cuda":
            return tensor
        # Pinned host memory lets the copy run asynchronously with the host's next work.
        tensor = tensor.pin_memory().to(self._device, non_blocking=True)
        if self.spec.channels_last and tensor.ndim == 4:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        return tensor.to(_DTYPES[self.spec.precision]) if self.spec.precision != "fp32" else tensor

    def warm_up(self) -> None:
        """One pass on zeros, so the first real job does not pay for lazy initialisation."""
        self.infer(np.zeros(example_shape(self.spec), dtype=np.float32))

    def run(self, blob: bytes) -> dict[str, Any]:
        """The job's result for its stored input."""
        tensor, info = self.prepare(blob)
        batch = tensor[np.newaxis] if isinstance(self.spec.input, ImageInput) else tensor
        return build_result(self.spec, self.infer(batch), info)

    def prepare(self, blob: bytes) -> tuple[np.ndarray, ImageInfo | None]:
        """One job's model input without a batch axis: for an image model the float32 (channels, height, width)
        tensor and its ImageInfo (decoded, checked against the model, fitted, normalised); for a tensor model
        its (rows, ...) float32 array and None. Client errors raise as `InvalidImage` / `InvalidTensor` etc."""
        return prepare_input(self.spec, blob, max_image_pixels=self._max_image_pixels)


def prepare_input(spec: ModelSpec, blob: bytes, *, max_image_pixels: int) -> tuple[np.ndarray, ImageInfo | None]:
    """`ModelRunner.prepare` without the model: what a decoding stage that runs on its own needs."""
    if isinstance(spec.input, ImageInput):
        return preprocess(blob, spec.input, max_image_pixels=max_image_pixels)
    return tensor_from_bytes(blob, spec.input).astype(np.float32, copy=False), None


def _apply_head(head: str, logits: torch.Tensor) -> torch.Tensor:
    if head == "sigmoid":
        return torch.sigmoid(logits)
    if head == "softmax":
        return torch.softmax(logits, dim=-1)
    return logits


def _checked_outputs(spec: ModelSpec, batch: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    if outputs.ndim == 1:
        outputs = outputs[:, np.newaxis]
    width = len(spec.labels) or outputs.shape[-1]
    if outputs.shape != (batch.shape[0], width):
        raise InferenceError(f"model {spec.name!r} answered shape {outputs.shape} for a batch of {batch.shape[0]}")
    if not np.isfinite(outputs).all():
        raise InferenceError(f"model {spec.name!r} answered NaN or infinity")
    return outputs.astype(np.float32, copy=False)


def example_shape(spec: ModelSpec) -> tuple[int, ...]:
    if isinstance(spec.input, ImageInput):
        return (1, spec.input.channels, spec.input.height, spec.input.width)
    return tuple(1 if d == -1 else d for d in spec.input.shape)


def build_result(spec: ModelSpec, outputs: np.ndarray, info: ImageInfo | None) -> dict[str, Any]:
    result: dict[str, Any] = {"model": spec.name, "model_version": spec.version, "trained": spec.trained}
    if not spec.trained:
        result["warning"] = UNTRAINED_WARNING
    if info is not None:
        result["findings"] = [
            {"label": label, "probability": float(p)} for label, p in zip(spec.labels, outputs[0], strict=True)
        ]
        result["image"] = info.to_dict()
    else:
        result["labels"] = list(spec.labels)
        result["outputs"] = [encode_tensor(spec.output_name, outputs)]
    return result


def load_runner(spec: ModelSpec, settings: Settings, device: torch.device) -> ModelRunner:
    module = load_model(spec, settings, device)
    if device.type == "cuda":
        # Precision and memory format are the registry's per-model choice, and only pay off on a GPU.
        if spec.precision != "fp32":
            module = module.to(_DTYPES[spec.precision])
        if spec.channels_last:
            module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return ModelRunner(spec, module, device, max_image_pixels=settings.max_image_pixels)
