"""Loading a `torch.export` archive (.pt2) without ever unpickling.

`torch.export.load` is not pickle-free: a weight or constant stored with `use_pickle`, a custom or opaque object
constant, sample inputs that the restricted (`weights_only`) loader refuses, and the legacy archive layout are all
read with a full unpickler (`torch.load(weights_only=False)`, `pickle.loads`), and AOTInductor payloads are native
code. So the archive is inspected first, as a zip of JSON and raw tensor bytes, and refused unless every part
loads without one; its sample inputs (always written with torch.save) are emptied; only then is it handed to
`torch.export.load`, on which no unpickling path is left to take.
"""

from __future__ import annotations

import io
import json
import pickletools
import zipfile
from typing import Any

import torch
from torch.export.pt2_archive import constants as pt2

from inferq.protocol.errors import ModelLoadError

# Payloads that are compiled code rather than a graph of torch operators.
_NATIVE_CODE_DIRS = (pt2.AOTINDUCTOR_DIR, pt2.EXECUTORCH_DIR, pt2.MTIA_DIR)
# What torch.save's own pickle names to rebuild tensors and their containers ("module name", as GLOBAL reads).
_ALLOWED_GLOBALS = ("torch ", "torch.", "collections OrderedDict")
# The pre-2.7 layout, which torch.export.load reads with torch.load(weights_only=False).
_LEGACY_MARKERS = ("version", "serialized_exported_program.json")


def _refuse(reason: str) -> ModelLoadError:
    return ModelLoadError(f"refusing the torch-export archive: {reason}; re-export it with torch.export.save")


def _entries(archive: zipfile.ZipFile) -> dict[str, str]:
    """Archive entries by their path below the archive's root folder."""
    entries = {}
    for name in archive.namelist():
        _, _, inner = name.partition("/")
        entries[inner or name] = name
    return entries


def _config(archive: zipfile.ZipFile, entries: dict[str, str], inner: str) -> dict[str, Any]:
    if inner not in entries:
        raise _refuse(f"{inner} is missing")
    config = json.loads(archive.read(entries[inner])).get("config", {})
    return config if isinstance(config, dict) else {}


def _check_model(archive: zipfile.ZipFile, entries: dict[str, str], model: str) -> None:
    for meta in _config(archive, entries, pt2.WEIGHTS_CONFIG_FILENAME_FORMAT.format(model)).values():
        if meta.get("use_pickle"):
            raise _refuse("a weight is stored pickled")
    for meta in _config(archive, entries, pt2.CONSTANTS_CONFIG_FILENAME_FORMAT.format(model)).values():
        if meta.get("use_pickle") or not str(meta.get("path_name", "")).startswith(pt2.TENSOR_CONSTANT_FILENAME_PREFIX):
            raise _refuse("a constant is a pickled tensor or a Python object")


def _check_sample_inputs(raw: bytes) -> None:
    """Sample inputs are a torch.save file: a zip whose data.pkl may name only torch's own tensor rebuilders. Read as
    opcodes (pickletools executes nothing); anything else is a planted payload, refused. They are never loaded."""
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as saved:
            [pickled] = [name for name in saved.namelist() if name.endswith("/data.pkl")]
            opcodes = list(pickletools.genops(saved.read(pickled)))
    except (zipfile.BadZipFile, ValueError) as e:
        raise _refuse("its sample inputs are not a torch.save file") from e
    for opcode, arg, _ in opcodes:
        if opcode.name in ("STACK_GLOBAL", "INST", "OBJ") or (
            opcode.name == "GLOBAL" and not str(arg).startswith(_ALLOWED_GLOBALS)
        ):
            raise _refuse(f"its sample inputs name a Python object ({arg or opcode.name})")


def check_export_archive(data: bytes) -> None:
    """Raise `ModelLoadError` unless `torch.export.load` can read `data` without unpickling or native code."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as e:
        raise _refuse("it is not a zip archive") from e
    with archive:
        entries = _entries(archive)
        if pt2.ARCHIVE_FORMAT_PATH not in entries or any(m in entries for m in _LEGACY_MARKERS):
            raise _refuse("it is not in the current PT2 archive format")
        if any(inner.startswith(_NATIVE_CODE_DIRS) for inner in entries):
            raise _refuse("it carries compiled native code (AOTInductor, ExecuTorch or MTIA)")
        if any(inner.startswith((pt2.WEIGHTS_DIR, pt2.CONSTANTS_DIR)) and inner.endswith(".pt") for inner in entries):
            raise _refuse("it carries pickled weights or constants")
        models = [
            inner[len(pt2.MODELS_DIR) : -len(".json")]
            for inner in entries
            if inner.startswith(pt2.MODELS_DIR) and inner.endswith(".json")
        ]
        if models != ["model"]:
            raise _refuse("it must hold exactly one exported program, named 'model'")
        for model in models:
            _check_model(archive, entries, model)
            sample_inputs = entries.get(pt2.SAMPLE_INPUTS_FILENAME_FORMAT.format(model))
            if sample_inputs is not None and archive.getinfo(sample_inputs).file_size > 0:
                _check_sample_inputs(archive.read(sample_inputs))


def _without_sample_inputs(data: bytes) -> bytes:
    """The archive with its sample inputs emptied: they are the one part torch.export.save always writes with
    torch.save (pickle), and inference never needs them; empty, torch.export.load does not read them at all."""
    source = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with source, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as copy:
        for item in source.infolist():
            _, _, inner = item.filename.partition("/")
            copy.writestr(item, b"" if inner.startswith(pt2.SAMPLE_INPUTS_DIR) else source.read(item))
    return out.getvalue()


def load_export_archive(data: bytes) -> torch.export.ExportedProgram:
    check_export_archive(data)
    return torch.export.load(io.BytesIO(_without_sample_inputs(data)))
