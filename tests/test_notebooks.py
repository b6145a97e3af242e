"""The one notebook generator: it writes every run notebook the study registry names, and regenerating leaves the
committed notebooks unchanged byte for byte (a changed params default or cell fails here until regenerated)."""
import nbformat

from efficientllm_utils import notebooks, study_registry
from efficientllm_utils.paths import REPO_ROOT


def test_regenerating_leaves_every_committed_notebook_unchanged():
    assert notebooks.stale() == [], "run: python -m efficientllm_utils.notebooks"


def test_every_study_names_a_generated_notebook_and_every_notebook_is_generated():
    generated = set(notebooks.notebooks())
    named = {study.notebook for study in study_registry.STUDIES}
    committed = {str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "notebooks").rglob("*.ipynb")
                 if ".ipynb_checkpoints" not in p.parts}
    assert named <= generated
    assert committed == generated


def test_every_notebook_has_one_parameters_cell_then_validates_its_run_model(tmp_path):
    for path, nb in notebooks.notebooks().items():
        tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
        assert tagged == [1], path  # after the title, before anything runs
        assert ".from_namespace(globals())" in nb.cells[2].source, path
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), path
    written = notebooks.write(tmp_path)
    assert len(written) == len(notebooks.notebooks())
    assert notebooks.stale(tmp_path) == []
    nbformat.validate(nbformat.read(written[0], as_version=4))
