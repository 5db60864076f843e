"""The shipped registry is valid, and a broken one fails loudly at start."""

from __future__ import annotations

from pathlib import Path

import pytest

from inferq.config import DEFAULT_REGISTRY_PATH
from inferq.protocol.errors import ConfigError, UnknownModel
from inferq.protocol.registry import ImageInput, TensorInput, load_registry, parse_registry


def test_the_shipped_registry_declares_both_models() -> None:
    registry = load_registry(DEFAULT_REGISTRY_PATH)
    chest, fraud = registry.get_model("chest-xray"), registry.get_model("fraud")
    assert isinstance(chest.input, ImageInput) and (chest.input.height, chest.input.width) == (224, 224)
    assert chest.input.channels == 1 and len(chest.labels) == 14 and chest.architecture is not None
    assert isinstance(fraud.input, TensorInput) and fraud.input.shape == (-1, 30) and fraud.pool == "cpu"
    assert not chest.trained and not fraud.trained
    assert chest.metadata()["trained"] is False


def test_an_unknown_model_names_the_known_ones() -> None:
    with pytest.raises(UnknownModel, match="chest-xray"):
        load_registry(DEFAULT_REGISTRY_PATH).get_model("nope")


_GOOD = {
    "version": "1",
    "weights": "w.safetensors",
    "sha256": "a" * 64,
    "trained": False,
    "architecture": {"name": "mlp", "hidden": [4]},
    "input": {"kind": "tensor", "shape": [-1, 3]},
}


@pytest.mark.parametrize(
    "changes",
    [
        {"sha256": "abc"},
        {"architecture": None},
        {"input": {"kind": "tensor", "shape": [0, 3]}},
        {"input": {"kind": "image", "height": 8, "width": 8, "mean": [0.1, 0.2]}},
        {"time_limit_s": 0},
        {"surprise": 1},
    ],
)
def test_invalid_entries_are_refused(changes: dict[str, object]) -> None:
    entry = {k: v for k, v in {**_GOOD, **changes}.items() if v is not None}
    with pytest.raises(ConfigError):
        parse_registry({"models": {"m": entry}})


def test_two_models_may_not_share_a_queue() -> None:
    with pytest.raises(ConfigError, match="queue"):
        parse_registry({"models": {"a": _GOOD, "b": {**_GOOD, "queue": "a"}}})


def test_an_unreadable_file_is_a_clear_error(tmp_path: Path) -> None:
    broken = tmp_path / "models.toml"
    broken.write_text("[models.a\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_registry(broken)


def test_a_configuration_mistake_is_not_a_client_error() -> None:
    from inferq.protocol.errors import ClientError, InferqError

    assert issubclass(ConfigError, InferqError) and not issubclass(ConfigError, ClientError)
    assert ConfigError("x").to_dict() == {"code": "config_error", "message": "x", "retryable": False}
