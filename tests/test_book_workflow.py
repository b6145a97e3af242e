"""The CI workflow that publishes the book (.github/workflows/book.yml) runs the project's own commands."""
import re
import shlex

import yaml

from efficientllm_utils.book import BOOK_DIR
from efficientllm_utils.cli import main as cli_main

REPO = BOOK_DIR.parent
WORKFLOW = REPO / ".github" / "workflows" / "book.yml"


def _makefile_targets() -> set[str]:
    return set(re.findall(r"^([a-z][a-z-]*):", (REPO / "Makefile").read_text(), flags=re.M))


def _steps(workflow: dict) -> list[dict]:
    return [step for job in workflow["jobs"].values() for step in job.get("steps", [])]


def test_the_book_workflow_builds_with_the_projects_commands_and_deploys_to_pages():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    triggers = workflow[True] if True in workflow else workflow["on"]  # YAML 1.1 reads a bare `on` as true
    assert "main" in triggers["push"]["branches"] and "workflow_dispatch" in triggers
    assert workflow["permissions"]["pages"] == "write" and workflow["permissions"]["id-token"] == "write"

    uses = [step["uses"].split("@")[0] for step in _steps(workflow) if "uses" in step]
    for action in ("actions/checkout", "actions/setup-python", "actions/upload-pages-artifact",
                   "actions/deploy-pages"):
        assert action in uses, action
    assert uses.index("actions/upload-pages-artifact") > uses.index("actions/checkout")
    assert workflow["jobs"]["deploy"]["needs"] == "build"
    assert workflow["jobs"]["deploy"]["environment"]["name"] == "github-pages"

    # every command it runs is a Makefile target, in the order install, build
    commands = [shlex.split(line) for step in _steps(workflow) if "run" in step
                for line in step["run"].splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["make", "env"], ["make", "book"]]
    assert {c[1] for c in commands} <= _makefile_targets()
    # `make book` is the CLI's `book` command, and the artifact is the folder it writes index.html into
    assert re.search(r"^book: .*\n\t.*-m efficientllm_utils book", (REPO / "Makefile").read_text(), flags=re.M)
    (artifact,) = [s["with"]["path"] for s in _steps(workflow) if s.get("uses", "").startswith(
        "actions/upload-pages-artifact")]
    assert REPO / artifact == BOOK_DIR / "_build" / "html"


def test_the_cli_has_the_book_command_the_workflow_builds_with(capsys):
    try:
        cli_main(["book", "--help"])
    except SystemExit as done:
        assert done.code == 0
    assert "--results" in capsys.readouterr().out


def test_make_lab_runs_as_root():
    lab = re.search(r"^lab: .*\n\t(.*)$", (REPO / "Makefile").read_text(), flags=re.M).group(1)
    assert "--allow-root" in lab and "id -u" in lab  # only added when the user is root (uid 0)
