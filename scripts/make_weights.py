"""Generate the untrained, reproducible weights of every registry model that has a `weights_seed`.

    python scripts/make_weights.py [--registry PATH] [--models-dir DIR] [--print-sha]

Each file is (re)written, then checked against the registry's sha256. With `--print-sha` nothing is checked: the
sha256 lines are printed for pasting into the registry, after a change of architecture or generator.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run as a plain script from a checkout, the repo root is not on sys.path (only scripts/ is) and inferq may not be
# installed: put the root first so that `config`, `protocol` and `workers` import from this checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inferq.config.settings import Settings
from inferq.protocol.errors import InferqError
from inferq.protocol.registry import ModelSpec, load_registry
from inferq.workers.weights import verify_checksum, write_weights


def _parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Generate the untrained, reproducible weights of the registry.")
    parser.add_argument("--registry", type=Path, help="model registry (default: the settings' registry_path)")
    parser.add_argument("--models-dir", type=Path, help="where weights go (default: the settings' models_dir)")
    parser.add_argument(
        "--print-sha", action="store_true", help="print each file's sha256 for the registry instead of checking it"
    )
    return parser.parse_args(argv)


def _settings(arguments: argparse.Namespace) -> Settings:
    overrides = {"registry_path": arguments.registry, "models_dir": arguments.models_dir}
    return Settings(**{name: value for name, value in overrides.items() if value is not None})


def _make(spec: ModelSpec, settings: Settings, *, print_sha: bool) -> None:
    path = settings.resolve_weights(spec.weights)
    sha256 = write_weights(spec, path)
    if print_sha:
        print(f'[models.{spec.name}] sha256 = "{sha256}"  # {path}')
        return
    verify_checksum(spec, path)
    print(f"{spec.name}\t{path}\t{sha256}")


def main(argv: list[str] | None = None) -> int:
    arguments = _parse_arguments(argv)
    try:
        settings = _settings(arguments)
        generated = [spec for spec in load_registry(settings.registry_path).values() if spec.weights_seed is not None]
        for spec in generated:
            _make(spec, settings, print_sha=arguments.print_sha)
    except InferqError as e:
        print(f"make_weights: {e.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
