"""The README's main command on the smoke profile: papermill runs on Dask, records, aggregate, the book."""
import re

import pandas as pd
import pytest

from efficientllm_utils import cli
from efficientllm_utils.book import build_book
from efficientllm_utils.records import load_records

from .conftest import book_copy

pytestmark = pytest.mark.slow


def test_smoke_profile_end_to_end(results_root, tmp_path, monkeypatch):
    assert cli.main(["run", "quantization", "--profile", "smoke", "--results", str(results_root)]) == 0
    records = load_records("quantization", "smoke", results_root)
    assert {r.params["precision"] for r in records} == {"fp32", "int4-nf4"}
    assert all(r.status == "ok" for r in records)
    for r in records:
        for metric in ("amu_gb", "pcu", "al_s", "it_tokens_per_s", "aec_w", "model_bytes"):
            assert metric in r.metrics  # all six metrics, measured or labelled missing
        assert r.raw["requests"] and all(s["latency_s"] > 0 for s in r.raw["requests"])
        assert r.provenance["hardware"]["logical_cores"] >= 1
    frame = pd.read_parquet(results_root / "quantization" / "smoke" / "runs.parquet")
    assert len(frame) == 2 and frame["model_bytes"].nunique() == 2

    book = book_copy(tmp_path)
    monkeypatch.setenv("EFFICIENTLLM_BOOK_PROFILE", "smoke")
    index = build_book(results_root, book)
    page = (index.parent / "quantization.html").read_text()
    text = re.sub(r"<[^>]+>", " ", page)
    assert "Traceback" not in text and "Error" not in text
    assert "int4-nf4" in text and "MCR" in text and "Kendall" in text
    assert "estimated:cpu-time-x-watts" in text  # the page says how energy was obtained
    runs = list((index.parent / "runs" / "quantization").glob("*.html"))
    assert len(runs) == 2
