"""A guard on the suite itself: every test function asserts something, directly or through a helper that does."""
import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
# calls that check: pytest's (a test that raises, warns, skips or fails on purpose) and any assert_* function
# (torch.testing.assert_close, numpy.testing.assert_array_equal, pandas.testing.assert_frame_equal, mocks)
CHECKING_CALLS = {"raises", "warns", "skip", "fail", "xfail"}


def _called_name(call: ast.Call) -> str | None:
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def _checks(node: ast.AST, helpers: set[str]) -> bool:
    """Whether ``node``'s body asserts, calls a checking function, or calls a helper that asserts."""
    for child in ast.walk(node):
        if isinstance(child, ast.Assert):
            return True
        if isinstance(child, ast.Call):
            name = _called_name(child)
            if name and (name.startswith("assert") or name in CHECKING_CALLS or name in helpers):
                return True
    return False


def _functions() -> list[tuple[Path, ast.FunctionDef]]:
    found = []
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((path, node))
    return found


def test_every_test_function_asserts_something():
    functions = _functions()
    helpers: set[str] = set()  # functions defined in tests/ that assert (directly or through another helper)
    while True:
        more = {f.name for _, f in functions if not f.name.startswith("test") and _checks(f, helpers)} - helpers
        if not more:
            break
        helpers |= more
    tested_files = {path.name for path, f in functions if f.name.startswith("test")}
    assert tested_files == {path.name for path in TESTS.glob("test_*.py")}  # the scan saw every test file
    silent = [f"{path.relative_to(TESTS)}:{f.lineno} {f.name}" for path, f in functions
              if f.name.startswith("test") and not _checks(f, helpers)]
    assert silent == [], "test functions that check nothing (no assert, pytest.raises or asserting helper)"


def test_the_guard_tells_a_silent_test_from_a_checking_one():
    tree = ast.parse("def helper(x):\n    assert x\n\n"
                     "def test_silent():\n    print(1)\n\n"
                     "def test_direct():\n    assert 1\n\n"
                     "def test_via_helper():\n    helper(1)\n\n"
                     "def test_raises():\n    with pytest.raises(ValueError):\n        int('x')\n\n"
                     "def test_close():\n    torch.testing.assert_close(a, b)\n")
    functions = {f.name: f for f in tree.body}
    verdicts = {name: _checks(f, {"helper"}) for name, f in functions.items() if name.startswith("test")}
    assert verdicts == {"test_silent": False, "test_direct": True, "test_via_helper": True, "test_raises": True,
                        "test_close": True}
