"""What every benchmark script shares: the machine description and writing its JSON result."""

from __future__ import annotations

import json
import os
import platform
import sys

import torch

__all__ = ["machine", "command", "write_result"]


def machine() -> str:
    """CPU architecture, cores, torch version and threads of this run."""
    return f"{platform.machine()} {os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def command(module: str) -> str:
    """The command line that reproduces this run."""
    return " ".join(["python -m", module, *sys.argv[1:]])


def write_result(result: dict, path: str) -> None:
    """Write `result` as indented JSON to `path` (creating its folder) and print it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as handle:
        json.dump(result, handle, indent=2)
    print(json.dumps(result, indent=2))
