"""A torch.export archive loads only if no part of it needs an unpickler or native code."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from inferq.config import Settings
from inferq.protocol.errors import ModelLoadError
from inferq.workers.export_archive import check_export_archive
from inferq.workers.weights import load_model
from tests.workers.test_weights import CPU, _tiny_module, _tiny_spec


class _Planted:
    """Unpickling this creates a file: proof that a full unpickler ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def _archive() -> bytes:
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(_tiny_module(), (torch.randn(4, 6),)), buffer)
    return buffer.getvalue()


def _rewrite(data: bytes, change: Callable[[str, bytes], bytes | None], extra: dict[str, bytes] | None = None) -> bytes:
    """The archive with each entry passed through `change` (None drops it), plus `extra` entries."""
    source = zipfile.ZipFile(io.BytesIO(data))
    root = source.namelist()[0].split("/", 1)[0]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for name in source.namelist():
            content = change(name.split("/", 1)[1], source.read(name))
            if content is not None:
                target.writestr(name, content)
        for inner, content in (extra or {}).items():
            target.writestr(f"{root}/{inner}", content)
    return out.getvalue()


def _with_pickled_weight(inner: str, content: bytes) -> bytes:
    if inner.endswith("_weights_config.json"):
        config = json.loads(content)
        next(iter(config["config"].values()))["use_pickle"] = True
        return json.dumps(config).encode()
    return content


def test_a_plain_export_archive_passes_the_check() -> None:
    check_export_archive(_archive())


def test_planted_sample_inputs_are_refused_before_anything_is_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    planted = pickle.dumps((_Planted(marker),))
    data = _rewrite(_archive(), lambda inner, c: planted if inner.startswith("data/sample_inputs/") else c)
    path = tmp_path / "planted.pt2"
    path.write_bytes(data)
    with pytest.raises(ModelLoadError, match="sample inputs"):
        load_model(_tiny_spec(path, "torch-export"), Settings(models_dir=tmp_path), CPU)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda a: _rewrite(a, _with_pickled_weight), "pickled"),
        (lambda a: _rewrite(a, lambda i, c: c, {"version": b"8.0"}), "current PT2 archive format"),
        (lambda a: _rewrite(a, lambda i, c: None if i == "archive_format" else c), "current PT2 archive format"),
        (lambda a: _rewrite(a, lambda i, c: c, {"data/aotinductor/model/x.so": b"\x7fELF"}), "native code"),
        (lambda a: _rewrite(a, lambda i, c: c, {"data/weights/model.pt": b"PK"}), "pickled weights"),
        (lambda a: b"not a zip", "not a zip"),
    ],
    ids=["pickled-weight", "legacy-version", "no-format", "aotinductor", "legacy-weights", "not-zip"],
)
def test_archives_that_would_unpickle_or_run_native_code_are_refused(
    make: Callable[[bytes], bytes], reason: str
) -> None:
    with pytest.raises(ModelLoadError, match=reason):
        check_export_archive(make(_archive()))


def test_loading_an_export_archive_never_calls_an_unpickler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tiny.pt2"
    path.write_bytes(_archive())

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)
    model = load_model(_tiny_spec(path, "torch-export"), Settings(models_dir=tmp_path), CPU)
    assert model(torch.randn(4, 6)).shape == (4, 2)
