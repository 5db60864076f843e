"""The registry's per-model queue limit: optional, never negative, and set for the shipped models."""

from __future__ import annotations

from typing import Any

import pytest

from inferq.config import DEFAULT_REGISTRY_PATH
from inferq.protocol.errors import ConfigError
from inferq.protocol.registry import load_registry, parse_registry


def _document(**extra: Any) -> dict[str, Any]:
    model = {
        "version": "1",
        "format": "torch-export",
        "weights": "m.pt",
        "sha256": "0" * 64,
        "trained": False,
        "input": {"kind": "tensor", "shape": [-1, 3]},
        **extra,
    }
    return {"models": {"m": model}}


def test_max_queue_depth_is_optional_and_listed() -> None:
    assert parse_registry(_document()).get_model("m").max_queue_depth is None
    spec = parse_registry(_document(max_queue_depth=50)).get_model("m")
    assert spec.max_queue_depth == 50 and spec.metadata()["max_queue_depth"] == 50
    # 0 means no limit, and is listed as such.
    assert parse_registry(_document(max_queue_depth=0)).get_model("m").metadata()["max_queue_depth"] is None


def test_a_negative_max_queue_depth_is_refused() -> None:
    with pytest.raises(ConfigError, match="max_queue_depth"):
        parse_registry(_document(max_queue_depth=-1))


def test_the_shipped_models_have_a_queue_limit() -> None:
    registry = load_registry(DEFAULT_REGISTRY_PATH)
    assert all((spec.max_queue_depth or 0) > 0 for spec in registry.values())
