"""The README's main command on the smoke profile: papermill runs on Dask, records, aggregate, the book."""
import json
import re

import pandas as pd
import pytest

from efficientllm_utils.records import cpu_flags, load_records

from .conftest import assert_valued

pytestmark = pytest.mark.slow


def test_smoke_profile_end_to_end(smoke_book):
    results_root, index = smoke_book.results_root, smoke_book.index
    assert smoke_book.code == 0
    records = load_records("quantization", "smoke", results_root)
    assert {r.params["precision"] for r in records} == {"fp32", "int4-nf4"}
    assert all(r.status == "ok" for r in records)
    for r in records:
        assert_valued(r.metrics, ("amu_gb", "pcu", "al_s", "it_tokens_per_s", "aec_w", "model_bytes"))  # all six
        assert r.raw["requests"] and all(s["latency_s"] > 0 for s in r.raw["requests"])
        assert r.provenance["hardware"]["logical_cores"] >= 1
        assert r.provenance["hardware"]["cpu_flags"] == cpu_flags()  # this machine's ({} without an x86 flags line)
    int4 = next(r for r in records if r.params["precision"] == "int4-nf4")
    kernel = int4.provenance["cpu_4bit"]  # which bitsandbytes CPU kernel ran, and why
    assert kernel["kernel"] == ("fused-bf16" if kernel["cpu_has_avx512bf16"] else "dequantize")
    assert kernel["layers_packed"] == (kernel["layers_4bit"] if kernel["kernel"] == "fused-bf16" else 0)
    frame = pd.read_parquet(results_root / "quantization" / "smoke" / "runs.parquet")
    assert len(frame) == 2 and frame["model_bytes"].nunique() == 2
    assert frame.set_index("param_precision")["cpu_4bit_kernel"].isna().to_dict() == {"fp32": True, "int4-nf4": False}

    page = (index.parent / "quantization.html").read_text()
    text = re.sub(r"<[^>]+>", " ", page)
    assert "Traceback" not in text and "Error" not in text
    assert "int4-nf4" in text and "MCR" in text and "Kendall" in text
    assert "4-bit kernels" in text and "repacked for the fused kernel" in text  # which kernel int4 ran, from the record
    assert "estimated:cpu-time-x-watts" in text  # the page says how energy was obtained
    runs = list((index.parent / "runs" / "quantization").glob("*.html"))
    assert len(runs) == 2


def test_smoke_records_hold_fidelity_to_the_reference(smoke_book):
    by_precision = {r.params["precision"]: r for r in load_records("quantization", "smoke", smoke_book.results_root)}
    reference, int4 = by_precision["fp32"].quality, by_precision["int4-nf4"].quality
    assert (reference["kl_to_reference"], reference["top1_agreement"], reference["flip_rate"]) == (0.0, 1.0, 0.0)
    assert int4["kl_to_reference"] > 0 and 0 <= int4["top1_agreement"] <= 1 and 0 <= int4["flip_rate"] <= 1
    assert int4["fidelity_tokens"] == len(by_precision["int4-nf4"].raw["fidelity"]["kl_per_token"]) > 0
    assert int4["flip_items"] == 2 * 4  # two tasks of four items
    assert int4["reference_fingerprint"] == reference["reference_fingerprint"]  # the same reference, any run order


def test_runner_output_and_run_pages_show_what_a_reader_needs(smoke_book):
    out = smoke_book.runner_output
    assert "[ok] precision=int4-nf4" in out  # the runner's own lines are there ...
    for noise in ("without encryption", "KeyboardInterrupt", "Port 8787 is already in use"):
        assert noise not in out  # ... the kernels' and Dask's chatter is not
    machine_path = str(smoke_book.results_root.parent)
    titles = set()
    for notebook in (smoke_book.index.parent.parent.parent / "runs" / "quantization").glob("*.ipynb"):
        text = notebook.read_text()
        nb = json.loads(text)
        titles.add("".join(nb["cells"][0]["source"]).splitlines()[0])
        assert machine_path not in text  # no absolute path of this machine, in sources, outputs or metadata
        injected = next(c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", []))
        assert re.search(r'result_dir = "quantization/smoke/precision=[\w-]+"', "".join(injected["source"]))
        streams = "".join("".join(o["text"]) for c in nb["cells"] for o in c.get("outputs", [])
                          if o["output_type"] == "stream")
        for noise in ("Loading weights", "it/s]", "%|", "warnings.warn(", "gemm_4bit_forward"):
            assert noise not in streams
    assert titles == {"# Quantization: smollm2-135m-instruct at fp32", "# Quantization: smollm2-135m-instruct at int4-nf4"}
    html = (smoke_book.index.parent / "runs" / "quantization").glob("*.html")
    assert all("Quantization: smollm2-135m-instruct at" in re.sub(r"<[^>]+>", " ", p.read_text()) for p in html)
