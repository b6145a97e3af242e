"""The study registry is the one source of each study's axis, params file, notebook, report, run title and the book's
table of contents; the params core and the registry import no domain code."""
import importlib.util
import subprocess
import sys

import pytest
import yaml

from efficientllm_utils import cli, study_registry
from efficientllm_utils.params import PARAMS_DIR, ParamsError, RunParams, run_model
from efficientllm_utils.paths import REPO_ROOT


def test_every_study_has_its_params_file_notebook_and_report_and_nothing_else_does():
    assert sorted(p.stem for p in PARAMS_DIR.glob("*.yaml")) == sorted(study_registry.BY_NAME)
    for study in study_registry.STUDIES:
        assert yaml.safe_load((PARAMS_DIR / f"{study.name}.yaml").read_text())["study"] == study.name
        assert (REPO_ROOT / study.notebook).is_file(), study.name
        if study.chapter is not None:
            assert (REPO_ROOT / "book" / f"{study.chapter}.md").is_file(), study.name
            assert importlib.util.find_spec(f"efficientllm_utils.reports.{study.report}") is not None, study.name


def test_run_models_resolve_and_unknown_studies_are_named():
    for study in study_registry.STUDIES:
        assert issubclass(run_model(study.name), RunParams), study.name
    with pytest.raises(ParamsError, match=r"field 'study': study 'nope' is not one of \[.*'quantization'"):
        run_model("nope")


def test_axes_and_axis_groups():
    assert study_registry.axis_studies("architecture") == ["attention", "positional_encoding", "moe",
                                                           "attention_free"]
    assert study_registry.axis_studies("dit") == ["dit_attention", "dit_moe"]
    assert study_registry.axis_studies("moe") == ["moe"]  # a study by its own name
    assert cli.studies_of("vlm") == ["vlm_peft", "vlm_quantization"]
    with pytest.raises(ValueError, match=r"AXIS 'nope' is not one of \['architecture', 'dit'"):
        study_registry.axis_studies("nope")


def test_committed_table_of_contents_is_the_registry_s():
    committed = yaml.safe_load((REPO_ROOT / "book" / "_toc.yml").read_text())
    assert committed == study_registry.book_toc(), "regenerate book/_toc.yml from study_registry.book_toc()"
    globs = [s["glob"] for part in committed["parts"] for c in part["chapters"] for s in c.get("sections", [])]
    assert sorted(g.split("/")[1] for g in globs) == sorted(s.name for s in study_registry.STUDIES if s.chapter)


def test_params_core_and_registry_load_no_domain_code():
    probe = ("import sys, efficientllm_utils.params, efficientllm_utils.records; "
             "print(sorted(m for m in sys.modules if m.startswith('efficientllm_utils.') or m == 'torch'))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert eval(loaded.stdout) == ["efficientllm_utils.code_fingerprint", "efficientllm_utils.metrics",
                                   "efficientllm_utils.metrics.machine_probe",
                                   "efficientllm_utils.metrics.values", "efficientllm_utils.params",
                                   "efficientllm_utils.paths", "efficientllm_utils.records",
                                   "efficientllm_utils.study_registry"]


def test_the_notebook_generator_writes_exactly_the_registry_s_notebooks():
    from efficientllm_utils.notebooks import notebooks

    assert sorted(notebooks()) == sorted({s.notebook for s in study_registry.STUDIES})


def test_run_pages_are_titled_from_the_registry_for_every_study():
    from efficientllm_utils import book

    assert book.run_title("dit_moe", "variant=moe-8x2", {"variant": "moe-8x2"}) == "DiT MoE: moe-8x2"
    assert book.run_title("dit_attention", "attention=nsa", {"attention": "nsa"}) == "DiT attention: nsa"
    for study in study_registry.STUDIES:  # every template names fields of its run model
        fields = set(run_model(study.name).model_fields)
        named = {part.split("}")[0] for part in study.run_title.split("{")[1:]}
        assert named <= fields, (study.name, named - fields)
