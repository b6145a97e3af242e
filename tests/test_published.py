"""The published copy: what ``publish`` copies, which results the book's view reads, and what a chapter says about
them (source, provenance, out-of-date runs)."""
import json

import pytest
import yaml

from efficientllm_utils import published
from efficientllm_utils.params import expand, params_path
from efficientllm_utils.records import RunRecord, write_record


def _write_runs(root, profile="cpu", labels=None, params_patch=None, load=1.0, cores=2, commit="abc1234567890"):
    """Records (and a notebook with a machine path and a progress bar) for the selftest grid's runs in ``root``."""
    specs = expand(params_path("selftest"), profile)
    written = []
    for spec in specs:
        if labels is not None and spec.label not in labels:
            continue
        params = {**spec.params, **(params_patch or {})}
        run_dir = root / "selftest" / profile / spec.run_id
        run_dir.mkdir(parents=True)
        record = RunRecord(run_id=spec.run_id, study="selftest", profile=profile, label=spec.label, status="ok",
                           params=params, finished="2026-11-30T01:02:03+00:00", quality={"saved": str(run_dir / "a")},
                           provenance={"git_commit": commit, "git_dirty": False, "load_average": {"5m": load},
                                       "hardware": {"summary": "Test CPU (2 logical cores)", "logical_cores": cores}})
        write_record(record, run_dir)
        notebook = {"cells": [{"cell_type": "code", "source": "x", "metadata": {}, "execution_count": 1,
                               "outputs": [{"output_type": "stream", "name": "stderr",
                                            "text": f" 50%|#####     | 1/2\nresult in {run_dir}/out.txt\n"
                                                    "/other/checkout/efficientllm_utils/x.py:9: UserWarning: y\n"}]}],
                    "metadata": {"papermill": {"input_path": "/elsewhere/checkout/notebooks/selftest.ipynb"}},
                    "nbformat": 4, "nbformat_minor": 5}
        (run_dir / "notebook.ipynb").write_text(json.dumps(notebook))
        (run_dir / "kernel.log").write_text("noise")
        (run_dir / "samples.png").write_bytes(b"\x89PNG")
        (run_dir / "checkpoint.bin").write_bytes(b"0")
        (run_dir / ".claim").write_text("")
        written.append(record)
    (root / "selftest" / profile / ".reference").mkdir(parents=True, exist_ok=True)
    return written


def test_publish_copies_records_and_portable_notebooks_of_the_current_grid_only(tmp_path):
    results, pub = tmp_path / "results", tmp_path / "published"
    _write_runs(results)
    old = results / "selftest" / "cpu" / "value=9-0123456789"  # a run of an earlier grid: not published
    old.mkdir()
    (old / "record.json").write_text((next((results / "selftest" / "cpu").glob("value=1-*")) / "record.json")
                                     .read_text())
    target = published.publish("selftest", "cpu", results, pub)
    runs = sorted(p.name for p in target.iterdir())
    assert runs == sorted(s.run_id for s in expand(params_path("selftest"), "cpu"))
    for run in target.iterdir():
        assert sorted(p.name for p in run.iterdir()) == ["notebook.ipynb", "record.json", "samples.png"]
        text = (run / "notebook.ipynb").read_text()
        assert str(tmp_path) not in text and "50%|" not in text and "result in" in text
        assert "/elsewhere" not in text and '"notebooks/selftest.ipynb"' in text
        assert "/other/checkout" not in text and "efficientllm_utils/x.py:9: UserWarning" in text
        assert json.loads((run / "record.json").read_text())["quality"]["saved"] == f"selftest/cpu/{run.name}/a"
    assert not list(target.parent.glob(".*"))  # no staging folder left, no score cache copied


def _noisy_png(size=160):
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def test_published_pictures_are_compressed_only_when_large_and_keep_their_size_and_format():
    import base64
    import io

    from PIL import Image

    png = _noisy_png()
    kind, smaller = published.compact_picture(png, "png")  # a saved file keeps its name: still a PNG
    assert kind == "png" and len(smaller) < len(png) / 2
    with Image.open(io.BytesIO(smaller)) as image:
        assert image.format == "PNG" and image.size == (160, 160)
    kind, smaller = published.compact_picture(png, "any")
    assert kind == "jpeg" and len(smaller) < len(png) / 2
    tiny = _noisy_png(8)
    assert published.compact_picture(tiny, "any") == ("png", tiny)  # small pictures are copied as they are

    outputs = [{"output_type": "display_data", "metadata": {},
                "data": {"image/png": base64.b64encode(p).decode(), "text/plain": "<Figure>"}} for p in (png, tiny)]
    nb = {"cells": [{"cell_type": "code", "source": "", "metadata": {}, "outputs": outputs}], "metadata": {},
          "nbformat": 4, "nbformat_minor": 5}
    large, small = json.loads(published.compact_notebook_pictures(json.dumps(nb)))["cells"][0]["outputs"]
    assert set(large["data"]) == {"image/jpeg", "text/plain"} and base64.b64decode(large["data"]["image/jpeg"])
    assert small["data"]["image/png"] == outputs[1]["data"]["image/png"]


def test_publish_without_records_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no records of the current selftest cpu grid"):
        published.publish("selftest", "cpu", tmp_path / "results", tmp_path / "published")


def test_book_view_prefers_local_results_and_falls_back_to_the_published_copy(tmp_path):
    results, pub, view = tmp_path / "results", tmp_path / "published", tmp_path / "view"
    _write_runs(pub, "cpu")
    _write_runs(pub, "smoke")
    _write_runs(results, "smoke")
    sources = published.book_view(results, view, pub)
    assert sources == {"selftest": {"cpu": "published", "smoke": "local"}}
    assert (view / "selftest" / "smoke").resolve() == (results / "selftest" / "smoke").resolve()
    assert (view / "selftest" / "cpu").resolve() == (pub / "selftest" / "cpu").resolve()
    assert published.source_of("selftest", "cpu", view) == "published"
    assert published.book_view(results, view, None) == {"selftest": {"smoke": "local"}}  # local only


def test_results_note_names_the_source_provenance_and_out_of_date_runs(tmp_path):
    pub, view = tmp_path / "published", tmp_path / "view"
    records = _write_runs(pub, "cpu", labels={"value=1", "value=2"}, commit="feedc0ffee1234")
    published.book_view(tmp_path / "none", view, pub)
    note = published.results_note("selftest", "cpu", records, view)
    assert "published copy" in note and "`feedc0ffee`" in note and "2026-11-30" in note
    assert "compressed" in note  # its pictures are not the originals, and the page says so
    assert "Out of date" not in note and "Not run yet:** value=3" in note and "busier" not in note

    stale = _write_runs(tmp_path / "other", "cpu", labels={"value=1"}, params_patch={"sleep_s": 5}, load=4.5)
    stale[0] = stale[0].model_copy(update={"run_id": "value=1-0000000000"})  # as if made under other params
    note = published.results_note("selftest", "cpu", stale, view)
    assert "Out of date:** 1 run(s)" in note and "sleep_s: 5 then, 0.0 now" in note
    assert "busier than its 2 cores (5-minute load average up to 4.5)" in note


@pytest.mark.slow
def test_a_fresh_clone_reads_every_chapter_from_the_published_copy(tmp_path, monkeypatch):
    """``make book`` with no results of its own: every chapter with a published study shows its runs, says they are
    the published copy, and no page says it has no results."""
    from efficientllm_utils.book import build_book

    from .conftest import book_copy

    studies = sorted(p.parent.name for p in published.PUBLISHED_DIR.glob("*/cpu"))
    if not studies:
        pytest.skip("this checkout has no published copy yet (make reproduce writes it)")
    monkeypatch.delenv("EFFICIENTLLM_BOOK_PROFILE", raising=False)
    index = build_book(tmp_path / "no-results", book_copy(tmp_path))
    pages = {p.stem: p.read_text() for p in index.parent.glob("*.html")}
    toc = yaml.safe_load((published.REPO_ROOT / "book" / "_toc.yml").read_text())
    chapter_of = {section["glob"].split("/")[1]: chapter["file"] for part in toc["parts"]
                  for chapter in part["chapters"] for section in chapter.get("sections", []) if "glob" in section}
    for study in studies:
        page = pages[chapter_of[study]]
        assert "These results are the published copy" in page and f"No results for <code" not in page, study
        assert "No results yet" not in page.split("These results are the published copy")[0], study
    for name, page in pages.items():  # no library warning or machine path on any page
        assert "site-packages" not in page and "Warning:" not in page, name
    run_pages = [p for study in studies for p in (index.parent / "runs" / study).glob("*.html")]
    assert len(run_pages) == sum(len(list((published.PUBLISHED_DIR / s / "cpu").glob("*/notebook.ipynb")))
                                 for s in studies)


def test_records_call_the_code_dirty_for_changed_code_but_not_for_a_refreshed_published_copy(tmp_path, monkeypatch):
    """``make reproduce`` publishes each study before running the next one: that must not mark the next study's
    records as made from uncommitted code."""
    import subprocess

    from efficientllm_utils import records

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "published").mkdir()
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "published" / "record.json").write_text("{}\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "start")
    monkeypatch.setattr(records, "REPO_ROOT", tmp_path)
    assert records.provenance()["git_dirty"] is False
    (tmp_path / "published" / "record.json").write_text('{"refreshed": true}\n')
    assert records.provenance()["git_dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert records.provenance()["git_dirty"] is True


def test_results_note_flags_runs_made_by_older_code_and_says_when_no_fingerprint_was_recorded(tmp_path):
    from efficientllm_utils.code_fingerprint import study_fingerprint

    pub, view = tmp_path / "published", tmp_path / "view"
    records = _write_runs(pub, "cpu", labels={"value=1", "value=2"})
    published.book_view(tmp_path / "none", view, pub)
    note = published.results_note("selftest", "cpu", records, view)  # records of before the fingerprint
    assert "Code fingerprint not recorded for 2 of 2 run(s)" in note and "Older code" not in note

    current = study_fingerprint("selftest")
    assert "efficientllm_utils.records" in current and any(k.startswith("notebook:") for k in current)
    fresh = [r.model_copy(update={"provenance": {**r.provenance, "code": dict(current)}}) for r in records]
    note = published.results_note("selftest", "cpu", fresh, view)
    assert "Older code" not in note and "not recorded" not in note

    older = dict(current, **{"efficientllm_utils.records": "000000000000"})
    fresh[0] = fresh[0].model_copy(update={"provenance": {**fresh[0].provenance, "code": older}})
    note = published.results_note("selftest", "cpu", fresh, view)
    assert "Older code:** 1 of 2 run(s)" in note and "`records`" in note


def test_code_fingerprint_ignores_docstrings_and_comments_but_not_code(tmp_path, monkeypatch):
    from efficientllm_utils import code_fingerprint as cf

    package = tmp_path / "efficientllm_utils"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "reports").mkdir()
    (package / "reports" / "__init__.py").write_text("")
    (package / "helper.py").write_text('"""Doc."""\nX = 1  # a comment\n')
    (package / "study.py").write_text("from . import helper\nfrom .reports import x\n\ndef f():\n    return helper.X\n")
    monkeypatch.setattr(cf, "REPO_ROOT", tmp_path)
    cf._module.cache_clear()
    code = "from efficientllm_utils import study\n"
    first = cf.modules_of(code)
    assert set(first) == {"efficientllm_utils", "efficientllm_utils.study", "efficientllm_utils.helper"}  # no reports
    (package / "helper.py").write_text('"""Another doc."""\n\nX = 1  # another comment\n')
    cf._module.cache_clear()
    assert cf.modules_of(code) == first
    (package / "helper.py").write_text('"""Doc."""\nX = 2\n')
    cf._module.cache_clear()
    assert cf.changed_code(first, cf.modules_of(code)) == ["efficientllm_utils.helper"]
    cf._module.cache_clear()
