"""A study's results as a report reads them: its records and their flat table, the profile a page shows."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..params import is_explored
from ..records import RESULTS_DIR, RunRecord, load_records


@dataclass
class StudyResults:
    study: str
    profile: str
    records: list[RunRecord]
    frame: pd.DataFrame  # flat rows, one per run
    root: Path = RESULTS_DIR  # the results folder (the book's: a view of local and published results)

    @property
    def ok(self) -> pd.DataFrame:
        if "status" not in self.frame:  # no records at all: an empty frame without columns
            return self.frame.copy()
        return self.frame[self.frame["status"] == "ok"].copy()

    @property
    def ok_records(self) -> list[RunRecord]:
        return [r for r in self.records if r.status == "ok"]

    def describe(self) -> str:
        """Where these numbers came from: the profile, how many runs succeeded, local results or the published
        copy, the commit, machine and dates of the runs, and runs whose parameters no longer match the params
        file (``published.results_note``)."""
        from ..published import results_note

        if not self.records:
            return f"No results for `{self.study}` yet: run `make reproduce AXIS={self.study}`."
        n_ok = sum(r.status == "ok" for r in self.records)
        return (f"Profile **{self.profile}**: {n_ok} of {len(self.records)} runs succeeded. "
                + results_note(self.study, self.profile, self.records, self.root))


def available_profiles(study: str, root: Path | None = None) -> list[str]:
    """The study's profiles with a results folder (not the folders of explored runs, which are no profile's)."""
    base = (root or RESULTS_DIR) / study
    return sorted(p.name for p in base.iterdir() if p.is_dir() and not is_explored(p.name)) if base.exists() else []


def load_study(study: str, profile: str | None = None, root: Path | None = None) -> StudyResults:
    """Results of one study. Without ``profile``: ``EFFICIENTLLM_BOOK_PROFILE``, else the profile whose
    latest record is newest."""
    profile = profile or os.environ.get("EFFICIENTLLM_BOOK_PROFILE")
    if profile is None:
        candidates = {p: load_records(study, p, root) for p in available_profiles(study, root)}
        candidates = {p: r for p, r in candidates.items() if r}
        profile = max(candidates, key=lambda p: max(r.finished or "" for r in candidates[p])) if candidates else "cpu"
    recs = load_records(study, profile, root)
    return StudyResults(study, profile, recs, pd.DataFrame([r.flat() for r in recs]), root or RESULTS_DIR)
