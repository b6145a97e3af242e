"""A two-model grid of every LLM study through the runner and the book: leaderboards and findings per model.

The quantization and fine-tuning studies take two tiny Llamas of different widths, saved with save_pretrained (their
``model`` field takes a local directory); the architecture studies build their decoders from config, so their two
"models" are two backbone widths (``hidden_size``) under each study's smoke variants. Each profile is its study's
``smoke`` profile with the model as a second grid axis (two variants), so the test stays smoke-sized. The architecture
studies' smoke end-to-end checks (every code path: MLA's latent cache, NSA's branches, relative bias, routed experts)
live here too, so their runs are not paid twice.
"""
import math
import re
from collections import Counter

import pandas as pd
import pytest
import yaml

from efficientllm_utils import cli, models
from efficientllm_utils.book import build_book
from efficientllm_utils.params import params_path
from efficientllm_utils.records import load_records
from efficientllm_utils.reports import architecture as ar
from efficientllm_utils.reports.load import load_study
from efficientllm_utils.reports import finetune as fr
from efficientllm_utils.reports import quantization as qr

from .conftest import assert_valued, book_copy

pytestmark = pytest.mark.slow

WIDTHS = {"tiny-llama-a": 32, "tiny-llama-b": 64}
ARCH_FIELDS = {"attention": "attention", "positional_encoding": "position", "moe": "variant"}
ARCH_WIDTHS = [32, 64]


def _tiny_llamas(root):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(models.resolve_source("smollm2-135m-instruct"))
    dirs = []
    for name, width in WIDTHS.items():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                             pad_token_id=2)
        LlamaForCausalLM(config).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        dirs.append(str(root / name))
    return dirs


def _smoke_grid(study: str) -> dict:
    return yaml.safe_load(params_path(study).read_text())["profiles"]["smoke"]["grid"]


def _profile(study: str, grid: dict, **fixed) -> dict:
    """The study's params file with one profile, ``two``: its smoke settings, ``fixed`` on top, and ``grid``."""
    spec = yaml.safe_load(params_path(study).read_text())
    smoke = spec["profiles"]["smoke"]
    two = {"description": "two models (test)", "hardware": "any CPU", "fixed": {**smoke["fixed"], **fixed},
           "grid": grid}
    if "variants" in smoke:
        two["variants"] = smoke["variants"]
    return {**spec, "default_profile": "two", "profiles": {"two": two}}


def test_two_model_grids_run_through_the_book(tmp_path, results_root, monkeypatch):
    llamas = _tiny_llamas(tmp_path)
    params_dir = tmp_path / "params"
    params_dir.mkdir()
    profiles = {
        "quantization": _profile("quantization", {"model": llamas, "precision": ["fp32", "int4-nf4"]},
                                 tasks=["boolq"], n_per_task=4, ppl_tokens=128, ppl_seq_len=32, prompt_tokens=8,
                                 new_tokens=2, warmup=0),
        "peft": _profile("peft", {"model": llamas, "method": ["lora", "freeze"]}, steps=2, batch_size=2, n_train=4,
                         n_heldout=4, max_length=96, timing_warmup_steps=1, final_loss_steps=1),
        **{study: _profile(study, {**_smoke_grid(study), "hidden_size": ARCH_WIDTHS}, steps=4, warmup_steps=1,
                           timing_warmup_steps=1) for study in ARCH_FIELDS},
    }
    for study, spec in profiles.items():
        (params_dir / f"{study}.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.setattr(cli, "params_path", lambda study: params_dir / f"{study}.yaml")

    for axis in ("quantization", "peft", *ARCH_FIELDS):  # the architecture axis but its attention-free study
        assert cli.main(["run", axis, "--profile", "two", "--results", str(results_root)]) == 0, axis

    # the report layer: per model, each beside the paper's size group that it chose and said why
    res = load_study("quantization", "two", results_root)
    table = qr.quantization_table(res)
    assert set(table["model"]) == set(WIDTHS) and table["MCR"].notna().all()
    boards = qr.leaderboards(table)
    assert {b.model for b in boards} == set(WIDTHS)
    assert all(b.size_group == "1.5B-3.8B" and "fewer than every group" in b.why for b in boards)
    assert {f.model for f in qr.findings(res)} == set(WIDTHS)
    peft = load_study("peft", "two", results_root)
    ft_table = fr.results_table(peft)
    assert {b.model for b in fr.leaderboards(ft_table)} == set(WIDTHS)
    assert {f.model for f in fr.findings(peft, ft_table)} == set(WIDTHS)
    arch_models = {f"hidden {w}, 1 layer" for w in ARCH_WIDTHS}
    for study, field in ARCH_FIELDS.items():
        _check_architecture_records(study, field, results_root)
        res = load_study(study, "two", results_root)
        table = ar.pretraining_table(res)
        assert set(table["model"]) == arch_models
        assert {b.model for b in ar.leaderboards(study, table)} == arch_models
        assert {f.model for f in ar.findings(res)} == arch_models, study

    book = book_copy(tmp_path)
    monkeypatch.setenv("EFFICIENTLLM_BOOK_PROFILE", "two")
    index = build_book(results_root, book, published_root=None)  # the two-model runs only
    # what each chapter's findings section shows, from the report layer
    studies = {chapter: load_study(chapter, "two", results_root) for chapter in ("quantization", *ARCH_FIELDS)}
    shown = {"quantization": qr.findings_text(studies["quantization"], qr.quantization_table(studies["quantization"])),
             "peft": fr.findings_text(peft, ft_table),
             **{study: ar.findings_text(studies[study], ar.pretraining_table(studies[study])) for study in ARCH_FIELDS}}
    for chapter, names in {"quantization": WIDTHS, "peft": WIDTHS,
                           **{study: arch_models for study in ARCH_FIELDS}}.items():
        page = (index.parent / f"{chapter}.html").read_text()
        text = re.sub(r"<[^>]+>", " ", page)
        assert "Traceback" not in text and "Error" not in text, chapter
        findings = text[text.index("Findings on this run"):]
        for name in names:
            assert name in findings, (chapter, name)  # findings per model
            assert re.search(rf"{re.escape(name)}\s+against the paper", text), (chapter, name)  # a board per model
        # every finding the report layer decides is on the page with its verdict, and no other
        verdicts = Counter(re.findall(r"\*\*(agrees|disagrees|inconclusive)\*\*:", shown[chapter]))
        assert verdicts and Counter(re.findall(r"\b(agrees|disagrees|inconclusive)\s*:", findings)) == verdicts, chapter
        assert "Kendall" in text and "<th" in page and 'class="row_heading' not in page  # no index column
        runs = list((index.parent / "runs" / chapter).glob("*.html"))
        assert len(runs) == len(load_records(chapter, "two", results_root)), chapter
    assert "estimated:cpu-time-x-watts" in (index.parent / "quantization.html").read_text()  # how energy was got


def _check_architecture_records(study, field, results_root):
    """Every run of an architecture study succeeded with every metric, from its raw samples."""
    records = load_records(study, "two", results_root)
    assert len(records) == 2 * len(ARCH_WIDTHS)
    for r in records:
        assert r.status == "ok", r.error
        for metric in ("perplexity", "final_loss", "initial_loss"):
            assert math.isfinite(r.quality[metric])
        assert_valued(r.metrics, ("al_s", "tt_tokens_per_param_s", "amu_gb", "pcu", "aec_w", "energy_j",
                                  "params_total", "params_active", "flops_per_token", "kv_cache_bytes_per_token",
                                  "kv_cache_bytes_per_token_measured"))
        for context in r.params["decode_contexts"]:
            assert r.metrics[f"decode_ctx{context}_latency_s"].value > 0
        assert len(r.raw["steps"]) == r.params["steps"] and r.raw["decode"]
    frame = pd.read_parquet(results_root / study / "two" / "runs.parquet")
    assert frame[f"param_{field}"].nunique() == 2 and frame["param_hidden_size"].nunique() == 2
    if study == "moe":
        moe = [r for r in records if r.params["variant"] == "moe-8x2"]
        assert all(r.metrics["params_active"].value < r.metrics["params_total"].value for r in moe)
