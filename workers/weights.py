"""Model weights: reproducible generation, sha256 verification, and loading with no Python object deserialization.

Weights the repo makes itself (a registry entry with `weights_seed`) must hash the same everywhere, or the sha256
in the registry would be no check at all. So their values come from the PCG64 bit stream (stable by NumPy's
policy) through exact IEEE arithmetic only, and the file is written by `_safetensors_bytes`: safetensors' own
writer emits its metadata in a random order per process, which changes the bytes from one run to the next.

Loading verifies the sha256 of the very bytes it then deserialises, so a file swapped after the check is never
run. Nothing is ever unpickled: safetensors is raw tensor bytes behind a JSON header; a torch.export archive is
inspected first and refused if `torch.export.load` would unpickle any part of it or load native code
(`workers.export_archive`). TorchScript archives, which are pickles, are refused by the registry.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from torch import nn

from inferq.config.settings import Settings
from inferq.protocol.errors import ChecksumMismatch, InferqError, ModelLoadError
from inferq.protocol.registry import ModelSpec
from inferq.workers.architectures import build_architecture

__all__ = [
    "ensure_generated_weights",
    "file_sha256",
    "generate_weights",
    "load_model",
    "verify_checksum",
    "write_weights",
]

_HASH_CHUNK_BYTES = 1024 * 1024
_SAFETENSORS_ALIGNMENT_BYTES = 8  # the header is space-padded so that the tensor data starts 8-byte aligned
_SAFETENSORS_DTYPES = {"f4": "F32", "i8": "I64"}  # NumPy kind and item size -> safetensors dtype
_BATCHNORM_CONSTANTS = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}
_MAKE_WEIGHTS = "python scripts/make_weights.py"


# --- generation


def _scaled_uniform(bits: np.random.PCG64, shape: tuple[int, ...], *, variance_gain: float) -> np.ndarray:
    """Uniform with variance `variance_gain / fan_in`: 2 is He's (a ReLU follows), 1 is LeCun's (logits follow).

    Built from raw 64-bit words with exact operations only: NumPy may change how `Generator.normal` draws (and it
    calls libm), but not the PCG64 stream, and IEEE multiplication rounds the same on every machine.
    """
    fan_in = math.prod(shape[1:])
    words = bits.random_raw(math.prod(shape))
    unit = (words >> np.uint64(11)).astype(np.float64) * 2.0**-53  # 53 random bits: exact doubles in [0, 1)
    bound = math.sqrt(3.0 * variance_gain / fan_in)  # a uniform on [-b, b] has variance b**2 / 3
    return ((2.0 * unit - 1.0) * bound).astype(np.float32).reshape(shape)


def _owner_and_attribute(module: nn.Module, key: str) -> tuple[nn.Module, str]:
    owner_name, _, attribute = key.rpartition(".")
    return module.get_submodule(owner_name), attribute


def _initial_value(
    owner: nn.Module, attribute: str, shape: tuple[int, ...], *, is_head: bool, bits: np.random.PCG64
) -> np.ndarray:
    if isinstance(owner, nn.Conv2d | nn.Linear) and attribute == "weight":
        # He's factor 2 makes up for the ReLU after a layer; the head's logits have none, so they get LeCun's 1
        # and land around 0 with a spread of about one: sigmoids spread around 0.5 rather than pinned to 0 or 1.
        return _scaled_uniform(bits, shape, variance_gain=1.0 if is_head else 2.0)
    if isinstance(owner, nn.Conv2d | nn.Linear) and attribute == "bias":
        return np.zeros(shape, dtype=np.float32)
    if isinstance(owner, nn.BatchNorm2d) and attribute in _BATCHNORM_CONSTANTS:
        return np.full(shape, _BATCHNORM_CONSTANTS[attribute], dtype=np.float32)
    if isinstance(owner, nn.BatchNorm2d) and attribute == "num_batches_tracked":
        return np.zeros(shape, dtype=np.int64)
    # A new layer type must get a deliberate rule here rather than silently keep torch's random init.
    raise ModelLoadError(f"no initialisation rule for {type(owner).__name__}.{attribute}")


def _head(module: nn.Module) -> nn.Module:
    # Both built-in architectures end in the last Linear they register: DenseNet's classifier, the MLP's output.
    return [submodule for submodule in module.modules() if isinstance(submodule, nn.Linear)][-1]


def generate_weights(spec: ModelSpec) -> dict[str, np.ndarray]:
    """The state dict of `spec`'s architecture, untrained, from `spec.weights_seed`; identical on every machine."""
    if spec.weights_seed is None:
        raise ModelLoadError(f"model {spec.name!r} has no weights_seed: its weights are not generated")
    # Built on the meta device for its names and shapes only: no memory, and torch's own RNG is never touched.
    with torch.device("meta"):
        module = build_architecture(spec)
    shapes = {key: tuple(tensor.shape) for key, tensor in module.state_dict().items()}
    head = _head(module)
    bits = np.random.PCG64(spec.weights_seed)
    weights = {}
    # Sorted keys fix the order in which the bit stream is consumed, whatever order torch registers modules in.
    for key in sorted(shapes):
        owner, attribute = _owner_and_attribute(module, key)
        weights[key] = _initial_value(owner, attribute, shapes[key], is_head=owner is head, bits=bits)
    return weights


# --- safetensors writing


def _safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """The safetensors encoding of `tensors` with a canonical header: sorted keys, no whitespace, fixed order."""
    # Widest dtype first, then by name, as safetensors' writer does, to keep every tensor aligned.
    names = sorted(tensors, key=lambda name: (-tensors[name].dtype.itemsize, name))
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    chunks: list[bytes] = []
    offset_bytes = 0
    for name in names:
        array = np.ascontiguousarray(tensors[name], dtype=tensors[name].dtype.newbyteorder("<"))
        chunks.append(array.tobytes())
        dtype = _SAFETENSORS_DTYPES[f"{array.dtype.kind}{array.dtype.itemsize}"]
        header[name] = {
            "dtype": dtype,
            "shape": list(array.shape),
            "data_offsets": [offset_bytes, offset_bytes + array.nbytes],
        }
        offset_bytes += array.nbytes
    header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("ascii")
    padding = -(8 + len(header_bytes)) % _SAFETENSORS_ALIGNMENT_BYTES
    header_bytes += b" " * padding
    return len(header_bytes).to_bytes(8, "little") + header_bytes + b"".join(chunks)


def _write_atomically(path: Path, data: bytes) -> None:
    # Workers starting together may all generate the file: each renames a complete file into place, never a part.
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as temporary:
        temporary_path = Path(temporary.name)
        try:
            temporary.write(data)
        except BaseException:
            temporary_path.unlink()
            raise
    # NamedTemporaryFile makes the file private (0600); weights are not secret and workers may run as another user.
    temporary_path.chmod(0o644)
    temporary_path.replace(path)


def write_weights(spec: ModelSpec, path: Path) -> str:
    """Generate `spec`'s weights into a safetensors file at `path`; returns its sha256 (hex)."""
    metadata = {"inferq.model": spec.name, "inferq.version": spec.version, "inferq.trained": "false"}
    data = _safetensors_bytes(generate_weights(spec), metadata)
    _write_atomically(path, data)
    return hashlib.sha256(data).hexdigest()


# --- checksums


def _chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as file:
        while chunk := file.read(_HASH_CHUNK_BYTES):
            yield chunk


def file_sha256(path: Path) -> str:
    """The sha256 (hex) of the file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    for chunk in _chunks(path):
        digest.update(chunk)
    return digest.hexdigest()


def _missing_file_error(spec: ModelSpec, path: Path) -> ModelLoadError:
    if spec.weights_seed is not None:
        fix = f"run `{_MAKE_WEIGHTS}` to generate it"
    else:
        fix = "put the model's file there or correct `weights` in the registry"
    return ModelLoadError(f"weights of model {spec.name!r} not found at {path}: {fix}")


def _check_digest(spec: ModelSpec, path: Path, actual_sha256: str) -> None:
    if actual_sha256 != spec.sha256:
        raise ChecksumMismatch(
            f"weights of model {spec.name!r} at {path} have sha256 {actual_sha256}, but the registry expects "
            f"{spec.sha256}; refusing to load them. Regenerate the file with `{_MAKE_WEIGHTS}` (generated weights), "
            "put the right file there, or update sha256 in the registry if this file is the one intended."
        )


def verify_checksum(spec: ModelSpec, path: Path) -> None:
    """Raise `ChecksumMismatch` unless the file's sha256 is the registry's; `ModelLoadError` if it cannot be read."""
    try:
        actual_sha256 = file_sha256(path)
    except FileNotFoundError:
        raise _missing_file_error(spec, path) from None
    except OSError as e:
        raise ModelLoadError(f"cannot read weights of model {spec.name!r} at {path}: {e}") from e
    _check_digest(spec, path, actual_sha256)


def _read_verified(spec: ModelSpec, path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _missing_file_error(spec, path) from None
    except OSError as e:
        raise ModelLoadError(f"cannot read weights of model {spec.name!r} at {path}: {e}") from e
    _check_digest(spec, path, hashlib.sha256(data).hexdigest())
    return data


# --- loading


def _from_safetensors(spec: ModelSpec, data: bytes, device: torch.device) -> nn.Module:
    module = build_architecture(spec)
    # strict: a missing or unexpected key means the file is not this architecture; never serve half-loaded weights.
    module.load_state_dict(load_safetensors(data), strict=True)
    return module.to(device).eval()


def _from_torch_export(data: bytes, device: torch.device) -> nn.Module:
    # Imported here: torch.export's archive code pulls in torch._dynamo, about 2.5 s of start-up for every worker
    # node and `inferq predict`, while the bundled models are safetensors.
    import torch.export.passes

    from inferq.workers.export_archive import load_export_archive

    program = torch.export.passes.move_to_device_pass(load_export_archive(data), device)
    module = program.module()
    # An exported graph fixed its train/eval behaviour at export time and its module refuses `.eval()`;
    # clearing the flags only makes `module.training` tell the truth to callers that check it.
    for submodule in module.modules():
        submodule.training = False
    return module


def _deserialise(spec: ModelSpec, data: bytes, device: torch.device) -> nn.Module:
    if spec.format == "safetensors":
        return _from_safetensors(spec, data, device)
    return _from_torch_export(data, device)


def load_model(spec: ModelSpec, settings: Settings, device: torch.device) -> nn.Module:
    """The model ready to serve: checksum verified first, in eval mode on `device`, parameters frozen."""
    path = settings.resolve_weights(spec.weights)
    data = _read_verified(spec, path)
    try:
        module = _deserialise(spec, data, device)
    except InferqError:
        raise
    except Exception as e:
        # Whatever a third-party loader raises, the model cannot be served: one error type for the worker to act on.
        raise ModelLoadError(f"cannot load model {spec.name!r} ({spec.format}) from {path}: {e}") from e
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


def ensure_generated_weights(spec: ModelSpec, settings: Settings) -> Path:
    """The verified weights file of `spec`; a missing file is generated first if the repo makes it (`weights_seed`)."""
    path = settings.resolve_weights(spec.weights)
    if spec.weights_seed is not None and not path.exists():
        write_weights(spec, path)
    verify_checksum(spec, path)
    return path
