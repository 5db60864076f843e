"""The model registry: what models exist, how they are fed, where their weights are and what they answer.

The registry is a TOML file (`config/models.toml` by default), one `[models.NAME]` table per model. This module
only declares and validates it; loading weights is the workers' business.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from inferq.protocol.errors import ConfigError, UnknownModel

_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_SHA256_PATTERN = r"^[0-9a-f]{64}$"
# Past the soft limit a job fails; this much later its process is ended if it is still computing.
HARD_LIMIT_GRACE_S = 15.0
Datatype = Literal["FP32", "FP64", "FP16", "INT64", "INT32", "INT16", "INT8", "UINT8", "BOOL"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ImageInput(_Frozen):
    """An image model's input: the picture is made grey, scaled to [0, 1], resized, then normalised."""

    kind: Literal["image"] = "image"
    height: int = Field(gt=0, le=4096)
    width: int = Field(gt=0, le=4096)
    channels: Literal[1, 3] = 1
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    # How a picture of another aspect ratio is fitted to height x width (docs/x-ray-input.md).
    resize: Literal["stretch", "letterbox", "center-crop"] = "stretch"
    # Accepted View Position terms (PA, AP, LL, ...) and Body Part Examined terms (CHEST, ...); empty accepts any.
    # An image whose header does not say is accepted: the header is checked only where it speaks.
    views: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _check_normalisation(self) -> ImageInput:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean and std need {self.channels} value(s), got {self.mean} and {self.std}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        return self


class TensorInput(_Frozen):
    """A tensor model's input in Open Inference Protocol terms; -1 in `shape` is a free (batch) dimension."""

    kind: Literal["tensor"] = "tensor"
    name: str = "input"
    shape: tuple[int, ...]
    datatype: Datatype = "FP32"

    @model_validator(mode="after")
    def _check_shape(self) -> TensorInput:
        if not self.shape or any(d == 0 or d < -1 for d in self.shape):
            raise ValueError(f"shape dimensions must be positive or -1, got {self.shape}")
        return self


InputSpec = Annotated[ImageInput | TensorInput, Field(discriminator="kind")]


class ArchitectureSpec(_Frozen):
    """A built-in architecture (for `format = "safetensors"`), with its own options."""

    name: Literal["densenet121", "mlp"]
    hidden: tuple[int, ...] = ()


class ModelSpec(_Frozen):
    """One model of the registry."""

    name: str
    version: str
    description: str = ""
    queue: str = ""
    pool: Literal["cpu", "gpu"] = "cpu"
    format: Literal["safetensors", "torch-export"] = "safetensors"
    architecture: ArchitectureSpec | None = None
    weights: str
    sha256: str = Field(pattern=_SHA256_PATTERN)
    trained: bool
    weights_seed: int | None = Field(
        default=None, description="Set for weights the repo generates itself (untrained, reproducible)."
    )
    input: InputSpec
    output_name: str = "output"
    head: Literal["sigmoid", "softmax", "identity"] = "sigmoid"
    labels: tuple[str, ...] = ()
    time_limit_s: float = Field(default=60.0, gt=0, description="Soft limit: past it the job fails with `timeout`.")
    hard_time_limit_s: float | None = Field(
        default=None, gt=0, description="Past it the worker process is ended; default: the soft limit + 15 s."
    )
    max_attempts: int = Field(default=3, ge=1, le=20, description="Attempts before a job is dead-lettered.")
    max_batch_size: int = Field(default=1, gt=0, description="Most rows (images, or tensor rows) in one forward pass.")
    batch_wait_ms: float = Field(default=0.0, ge=0, description="Longest wait for more jobs after a batch's first.")
    max_batch_ms: float | None = Field(
        default=None,
        gt=0,
        description="A batch holds fewer rows where they would take longer than this to compute (as measured by the "
        "worker), so that a STAT job waits at most about this long for the batch in progress; unset: no cap.",
    )
    precision: Literal["fp32", "fp16", "bf16"] = Field(default="fp32", description="On a GPU: the compute precision.")
    channels_last: bool = Field(default=False, description="On a GPU: channels-last memory format for conv nets.")
    preprocess: Literal["inline", "separate"] = Field(
        default="inline",
        description="separate: CPU workers decode on the `<queue>.prep` queue and hand the model's workers a tensor, "
        "so decoding never starves a GPU; inline: the model's worker decodes too.",
    )
    max_queue_depth: int | None = Field(
        default=None, ge=0, description="Past this many waiting jobs a submission is refused (429); 0 or unset: none."
    )

    @field_validator("format", mode="before")
    @classmethod
    def _no_torchscript(cls, value: object) -> object:
        # A TorchScript archive keeps its module and weights as pickles (data.pkl), read by an unpickler: refused by
        # name, so that the operator is told what to do instead.
        if value == "torchscript":
            raise ValueError(
                'format "torchscript" is not accepted: its archives are pickles; save the model with '
                'torch.export.save (format = "torch-export") or as safetensors with a built-in architecture'
            )
        return value

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if not _NAME_PATTERN.match(self.name):
            raise ValueError(f"model name {self.name!r} must be lowercase letters, digits, '-' or '_'")
        if self.format == "safetensors" and self.architecture is None:
            raise ValueError(f"model {self.name!r}: safetensors weights need an [architecture]")
        if self.hard_time_limit_s is not None and self.hard_time_limit_s <= self.time_limit_s:
            raise ValueError(f"model {self.name!r}: hard_time_limit_s must exceed time_limit_s")
        if self.input.kind == "image" and not self.labels:
            raise ValueError(f"model {self.name!r}: an image model needs labels for its findings")
        return self

    @property
    def queue_name(self) -> str:
        return self.queue or self.name

    @property
    def prep_queue_name(self) -> str | None:
        """The queue of the decoding stage, for a model whose preprocessing runs separately."""
        return f"{self.queue_name}.prep" if self.preprocess == "separate" else None

    @property
    def hard_limit_s(self) -> float:
        return self.hard_time_limit_s or self.time_limit_s + HARD_LIMIT_GRACE_S

    def metadata(self) -> dict[str, Any]:
        """What the API lists and every result repeats about the model."""
        return {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "queue": self.queue_name,
            "pool": self.pool,
            "trained": self.trained,
            "input": self.input.model_dump(),
            "labels": list(self.labels),
            "time_limit_s": self.time_limit_s,
            "max_batch_size": self.max_batch_size,
            "max_attempts": self.max_attempts,
            "max_queue_depth": self.max_queue_depth or None,
        }


class Registry(Mapping[str, ModelSpec]):
    """The models by name, in file order."""

    def __init__(self, models: Mapping[str, ModelSpec]) -> None:
        self._models = dict(models)

    def __getitem__(self, name: str) -> ModelSpec:
        return self._models[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._models)

    def __len__(self) -> int:
        return len(self._models)

    def get_model(self, name: str) -> ModelSpec:
        """The model, or `UnknownModel` naming the ones that exist."""
        try:
            return self._models[name]
        except KeyError:
            known = ", ".join(self._models) or "none"
            raise UnknownModel(f"unknown model {name!r}; known models: {known}") from None

    def select(self, names: list[str]) -> list[ModelSpec]:
        return [self.get_model(n) for n in names]

    def for_pool(self, pool: str) -> list[ModelSpec]:
        return [m for m in self._models.values() if m.pool == pool]


def parse_registry(document: Mapping[str, Any]) -> Registry:
    tables = document.get("models")
    if not isinstance(tables, Mapping) or not tables:
        raise ConfigError("the registry needs at least one [models.NAME] table")
    try:
        models = {name: ModelSpec(name=name, **table) for name, table in tables.items()}
    except ValidationError as e:
        raise ConfigError(f"invalid model registry: {e}") from e
    queues = [m.queue_name for m in models.values()]
    if len(set(queues)) != len(queues):
        raise ConfigError(f"two models share a queue: {queues}")
    return Registry(models)


def load_registry(path: Path) -> Registry:
    """Read and validate the registry file; a broken file fails loudly at start, not at the first job."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read the model registry {path}: {e}") from e
    return parse_registry(document)
