"""Every chapter page, run against the published records, asks the records only for columns they have: a metric
renamed in a study (or a report asking for one no study writes) fails here instead of showing as n/a in the book.

The pages' code cells run as the book runs them, with ``load_study`` handing out record tables that note every
column a report asks for (``frame[c]``, ``c in frame``, ``frame.get(c)``, and the same on a row of ``iterrows``).
Asking whether a metric says how it was obtained (``<metric>_method``, ``<metric>_unit``: ``display.methods_legend``)
is a question, not a need, and is not counted."""
import re
from collections import defaultdict

import pandas as pd
import pytest

from efficientllm_utils import published, records
from efficientllm_utils.reports import dit, load, lvm

ASKED: dict[str, set[tuple[str, bool]]] = defaultdict(set)


def _note(obj, key, names):
    if isinstance(key, str):
        ASKED[obj.attrs.get("study", "?")].add((key, key in names))


class _RecordRow(pd.Series):
    @property
    def _constructor(self):
        return _RecordRow

    @property
    def _constructor_expanddim(self):
        return _RecordFrame

    def __getitem__(self, key):
        _note(self, key, self.index)
        return super().__getitem__(key)

    def get(self, key, default=None):
        _note(self, key, self.index)
        return super().get(key, default)


class _RecordFrame(pd.DataFrame):
    @property
    def _constructor(self):
        return _RecordFrame

    @property
    def _constructor_sliced(self):
        return _RecordRow

    def __getitem__(self, key):
        _note(self, key, self.columns)
        return super().__getitem__(key)

    def __contains__(self, key):
        _note(self, key, self.columns)
        return super().__contains__(key)

    def get(self, key, default=None):
        _note(self, key, self.columns)
        return super().get(key, default)


def _code_cells(page) -> list[str]:
    cells = re.findall(r"```\{code-cell\}[^\n]*\n(.*?)```", page.read_text(), re.S)
    return ["\n".join(line for line in cell.splitlines() if not line.startswith((":", "---"))) for cell in cells]


def test_every_column_a_page_asks_for_is_in_the_published_records(monkeypatch):
    if not list(published.PUBLISHED_DIR.glob("*/cpu")):
        pytest.skip("this checkout has no published copy yet (make reproduce writes it)")
    import IPython.display
    import matplotlib

    matplotlib.use("Agg")
    for module in (records, load, dit, lvm):  # the results folder the pages read: the published copy
        monkeypatch.setattr(module, "RESULTS_DIR", published.PUBLISHED_DIR)
    monkeypatch.delenv("EFFICIENTLLM_BOOK_PROFILE", raising=False)
    monkeypatch.setattr(IPython.display, "display", lambda *args, **kwargs: None)
    unpatched = load.load_study

    def noting(study, profile=None, root=None):
        res = unpatched(study, profile, root or published.PUBLISHED_DIR)
        if not res.records:  # a profile without runs: a page says so, asking for nothing
            return res
        res.frame = _RecordFrame(res.frame)
        res.frame.attrs["study"] = study
        return res

    monkeypatch.setattr(load, "load_study", noting)
    ASKED.clear()
    pages = sorted((published.REPO_ROOT / "book").glob("*.md"))
    for page in pages:
        namespace = {}
        for i, cell in enumerate(_code_cells(page)):
            cell = cell.replace("from efficientllm_utils.reports.load import load_study",
                                "from efficientllm_utils.reports import load as _load; load_study = _load.load_study")
            exec(compile(cell, f"{page.name} cell {i}", "exec"), namespace)
    missing = {study: sorted(key for key, present in keys if not present and (key, True) not in keys
                             and not key.endswith(("_method", "_unit")))
               for study, keys in ASKED.items()}
    assert {s for s in ASKED} >= {p.parent.name for p in published.PUBLISHED_DIR.glob("*/cpu")}
    assert {s: keys for s, keys in missing.items() if keys} == {}


def test_published_records_carry_the_paper_metrics_under_their_declared_columns_and_units():
    """Every published record writes each of the paper's metrics it has under the declared column and a declared
    unit, and every metric is written by some study (a renamed column or a changed unit fails here)."""
    from efficientllm_utils.metrics.schema import PAPER_METRICS
    from efficientllm_utils.reports.leaderboard import HIGHER_IS_BETTER

    by_column = {m.column: m for m in PAPER_METRICS.values()}
    seen, wrong = set(), []
    for folder in published.PUBLISHED_DIR.glob("*/cpu"):
        for record in records.load_records(folder.parent.name, "cpu", published.PUBLISHED_DIR):
            for column, metric in record.metrics.items():
                if column in by_column:
                    seen.add(column)
                    if metric.unit not in by_column[column].units:
                        wrong.append((folder.parent.name, column, metric.unit))
    if not seen:
        pytest.skip("this checkout has no published copy yet (make reproduce writes it)")
    assert wrong == []
    assert seen == set(by_column)
    assert HIGHER_IS_BETTER["AL"] is False and HIGHER_IS_BETTER["TT"] is True  # ranks read the declared direction
