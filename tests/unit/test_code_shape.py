"""The code stays readable in the shape the project holds itself to (issue 20): no function in
the product packages longer than a screen (60 lines) or taking more than 6 parameters (group
them in a dataclass), no module over 450 lines. Counted from the AST, so it cannot drift."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("cluster", "learner", "rollout", "services")
MAX_LINES, MAX_PARAMS, MAX_MODULE_LINES = 60, 6, 450


def modules():
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            params = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
            params += ["*" + a.vararg.arg] if a.vararg else []
            params += ["**" + a.kwarg.arg] if a.kwarg else []
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1, params


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_functions_fit_a_screen_and_take_few_parameters(path):
    too_long = [(name, line, n) for name, line, n, _ in functions(path) if n > MAX_LINES]
    too_many = [(name, line, params) for name, line, _, params in functions(path) if len(params) > MAX_PARAMS]
    assert not too_long, f"functions over {MAX_LINES} lines: {too_long}"
    assert not too_many, f"functions over {MAX_PARAMS} parameters (use a dataclass): {too_many}"
    assert len(path.read_text().splitlines()) <= MAX_MODULE_LINES, f"{path} is over {MAX_MODULE_LINES} lines"


def test_the_counter_sees_what_it_counts(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    (tmp_path / "m.py").write_text(f"def long(a, b, c, d, e, f, g):\n{body}\n")
    [(name, _, lines, params)] = list(functions(tmp_path / "m.py"))
    assert (name, lines, len(params)) == ("long", 62, 7)
