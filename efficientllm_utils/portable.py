"""Executed run notebooks and records made portable: what the published copy and the book keep of a run, without
library noise in stream outputs and without this machine's paths."""
from __future__ import annotations

import json
import re
from pathlib import Path

from .paths import REPO_ROOT

# stream output lines that are library chatter, not results (the runner silences most at the source)
NOISE = re.compile("|".join([
    r"\d+%\|",  # a tqdm progress bar
    r"^\s*(Loading weights|Loading checkpoint shards|Converting and de-quantizing GGUF|Writing model shards)\b",
    r"Failed to load CPU gemm_4bit_forward",  # bitsandbytes without the optional `kernels` package
    r"^MatMul8bitLt: inputs will be cast",  # bitsandbytes' LLM.int8() on every matmul
    r"^Failed to load \S+/torchao/\S+\.so",  # torchao's optional CUDA extensions, on importing it without CUDA
    r"torch/utils/_pytree\.py:\d+\] <enum",  # torchao registers its enums with torch.compile on import
    r"Unable to import `torchao` Tensor objects",  # transformers' torchao probe, loading a quanto model
    r"site-packages/\S+:\d+: \w*Warning: ",  # a library's warning (and the source line under it, see _quiet)
]))


def _quiet(text: str) -> str:
    lines, after_warning = [], False
    for line in text.split("\n"):
        line = line.rsplit("\r", 1)[-1]  # a line redrawn with carriage returns shows its last state
        if after_warning and line.startswith("  "):  # the source line Python prints under a warning
            after_warning = False
            continue
        after_warning = bool(NOISE.search(line))
        if not after_warning:
            lines.append(line)
    return "\n".join(lines)


def without_machine_paths(text: str, results_root: Path) -> str:
    """JSON text with the results folder's and the repository's paths made relative (a path in the results folder
    becomes relative to it, one in the repository relative to the repository)."""
    for root in (Path(results_root).resolve(), Path(results_root), REPO_ROOT):  # longest first
        text = text.replace(json.dumps(f"{root}/")[1:-1], "").replace(json.dumps(str(root))[1:-1], ".")
    return OTHER_CHECKOUT.sub("", text)


# a path into another checkout of this repository (a run made elsewhere): its package or notebooks stay, relative
OTHER_CHECKOUT = re.compile(r"(?:(?<=\\n)|(?<![\w.]))/[^\s\"'\\:]*?/(?=(?:efficientllm_utils|notebooks)/)")


def portable_notebook(text: str, results_root: Path) -> str:
    """An executed notebook's JSON without progress bars or library warnings in its stream outputs and without
    machine paths (the results folder and the repository become relative paths): what the published copy keeps."""
    nb = json.loads(without_machine_paths(text, results_root))
    papermill = nb.get("metadata", {}).get("papermill", {})
    for key in ("input_path", "output_path"):  # a run made in another checkout keeps that checkout's paths here
        if str(papermill.get(key) or "").startswith("/"):
            path = papermill[key]
            papermill[key] = path[path.index("/notebooks/") + 1:] if "/notebooks/" in path else Path(path).name
    for cell in nb["cells"]:
        if "outputs" in cell:
            for output in cell["outputs"]:
                if output.get("output_type") == "stream":
                    output["text"] = _quiet("".join(output["text"]))
            cell["outputs"] = [o for o in cell["outputs"] if o.get("output_type") != "stream" or o["text"].strip()]
    return json.dumps(nb, indent=1, ensure_ascii=False)
