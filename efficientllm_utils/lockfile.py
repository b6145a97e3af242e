"""``make lock``: the exact versions an environment holds, as a pip constraints file (``requirements.lock``).

Local version labels are dropped (``torch==2.13.0+cpu`` becomes ``torch==2.13.0``), so the same lock serves a CPU
machine (where pip takes the CPU build on disk) and a GPU machine (PyPI's CUDA build of the same release); the
project itself (installed editable) is left out.
"""
from __future__ import annotations

import json
import subprocess
import sys

PROJECT = "efficientllm-utils"


def lock_lines(python: str) -> list[str]:
    listed = json.loads(subprocess.run([python, "-m", "pip", "list", "--format", "json", "--exclude-editable"],
                                       capture_output=True, text=True, check=True).stdout)
    pins = {p["name"].lower(): p["version"].split("+")[0] for p in listed if p["name"].lower() != PROJECT}
    pins.pop("pip", None)
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


if __name__ == "__main__":  # python -m efficientllm_utils.lockfile PYTHON
    print("# Exact versions `make test` last passed with (pip constraints). Refresh on purpose: make lock.")
    print("\n".join(lock_lines(sys.argv[1] if len(sys.argv) > 1 else sys.executable)))
