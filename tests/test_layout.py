"""The architecture, checked by machine: producers never import torch, and the import contracts hold."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO_ROOT

_CLIENT_MODULES = [
    "inferq.producers",
    "inferq.producers.api",
    "inferq.producers.cli",
    "inferq.producers.client",
    "inferq.producers.submit",
    "inferq.producers.demo",
    "inferq.producers.celery_app",
    "inferq.protocol.media",
    "inferq.protocol.intake",
    "inferq.protocol.celery_config",
]


def test_producers_and_the_api_never_import_torch() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in _CLIENT_MODULES)
        + "from inferq.producers.api import create_app\n"
        + "create_app()\n"
        + "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m == 'safetensors.torch'"
        + " or m.startswith('inferq.workers'))\n"
        + "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=120)


def test_the_import_contracts_hold() -> None:
    lint_imports = REPO_ROOT / ".venv" / "bin" / "lint-imports"
    command = [str(lint_imports)] if lint_imports.exists() else ["lint-imports"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
