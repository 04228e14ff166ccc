"""`python -m ftcluster`: the command line, once this Python is known to have what ftcluster needs.

A submitted job's entrypoint runs with the cluster's Python: ftcluster's own code travels with the
job, its dependencies must already be there (the ftcluster image, or `submit --pip`). A missing one
is named in one line here instead of a ModuleNotFoundError from deep inside an import.
"""

from __future__ import annotations

import importlib.util
import sys

# Import names of the dependencies every command loads (the others are checked where they are used).
REQUIRED = ("torch", "transformers", "peft", "accelerate", "safetensors", "ray", "pydantic", "yaml", "typer", "rich",
            "pyarrow", "wandb")


def missing_modules() -> list[str]:
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


def main() -> None:
    missing = missing_modules()
    if missing:
        print(f"error: {sys.executable} lacks {', '.join(missing)}, which ftcluster needs: run the job in the ftcluster "
              "image (k8s/Dockerfile), or submit it with --pip", file=sys.stderr)
        sys.exit(2)
    from ftcluster.cli.app import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
