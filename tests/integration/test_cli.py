"""The `inferq` command from the shell, against the running stack."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.integration.conftest import Stack

pytestmark = pytest.mark.slow


def _inferq(stack: Stack, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "inferq.producers.cli", *args]
    env = {**stack.env, "INFERQ_API_URL": stack.api_url}
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)


def test_submit_many_files_waits_and_prints_one_line_each(stack: Stack) -> None:
    files = [str(p) for p in stack.samples[:3]]
    done = _inferq(stack, "submit", *files, "--model", "chest-xray", "--wait")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert sorted(line["file"] for line in lines) == sorted(files)
    assert all(line["status"] == "succeeded" and len(line["result"]["findings"]) == 14 for line in lines)
    assert "waiting" in done.stderr  # the progress bar, on stderr so stdout stays JSON

    status = _inferq(stack, "status", lines[0]["job_id"])
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "succeeded"


def test_status_of_an_unknown_job_fails_with_the_code(stack: Stack) -> None:
    done = _inferq(stack, "status", "does-not-exist")
    assert done.returncode == 1 and json.loads(done.stdout)["error"]["code"] == "unknown_job"


def test_a_rejected_file_is_reported_and_the_exit_status_says_so(stack: Stack) -> None:
    bad = stack.tmp / "bad.txt"
    bad.write_text("hello")
    done = _inferq(stack, "submit", str(bad), "--model", "chest-xray")
    assert done.returncode == 1
    assert json.loads(done.stdout)["error"]["code"] == "unsupported_media_type"


def test_the_gpu_pool_refuses_to_start_without_a_gpu(stack: Stack) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    done = _inferq(stack, "worker", "--pool", "gpu", "--models", "chest-xray", timeout_s=180)
    assert done.returncode != 0
    assert "CUDA" in done.stderr
    # The plain Celery form, asked for CUDA through the settings, refuses the same way.
    argv = [sys.executable, "-m", "celery", "-A", "inferq.workers.app", "worker", "-Q", "chest-xray"]
    env = {**stack.env, "INFERQ_DEVICE": "cuda"}
    plain = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert plain.returncode != 0 and "CUDA" in plain.stderr
