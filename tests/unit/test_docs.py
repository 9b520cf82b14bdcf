"""The tables in docs/ against the code they are copied from, and every link and path the docs name.

- docs/configuration.md lists every field of the pydantic config (walked recursively from
  ``JobConfig``) once, with its default, and no key the config lacks;
- docs/observability.md lists the metric families of ``services.metrics.FAMILIES``: their names,
  types and labels;
- docs/errors.md has one row per case of tests/integration/test_user_errors*.py, and the text of
  each row's message stands in the source that writes it;
- docs/amm.md lists the registered losses with their parameters' defaults, and AMM's parameters
  with the defaults the loss resolves to;
- every relative link in README.md and docs/*.md points at a file (and heading) that exists, every
  repository path they name in code exists, and "`Name` in `file.py`" names something defined there.
"""
from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
SOURCE_PACKAGES = ("cluster", "learner", "rollout", "services", "tasks")
USER_ERRORS_TESTS = sorted((ROOT / "tests" / "integration").glob("test_user_errors*.py"))


# --- reading markdown -------------------------------------------------------------------------------

def prose(text: str) -> str:
    """``text`` without its fenced code blocks (their lines become empty, so line numbers stay)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            out.append("")
        else:
            out.append("" if fenced else line)
    return "\n".join(out)


def split_cells(line: str) -> list[str]:
    """The cells of a table row; ``\\|`` is a pipe inside a cell."""
    inner = line.strip()
    inner = inner[1:] if inner.startswith("|") else inner
    inner = inner[:-1] if inner.endswith("|") and not inner.endswith("\\|") else inner
    return [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", inner)]


def tables(path: Path, header: tuple[str, ...]) -> list[list[str]]:
    """Body rows of every table in ``path`` whose header cells are ``header`` (lower case)."""
    rows, lines, i = [], prose(path.read_text()).splitlines(), 0
    while i < len(lines):
        line = lines[i]
        is_sep = i + 1 < len(lines) and re.fullmatch(r"\|?\s*:?-{3,}.*", lines[i + 1].strip())
        if line.strip().startswith("|") and is_sep and tuple(c.lower() for c in split_cells(line)) == header:
            i += 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                cells = split_cells(lines[i])
                assert len(cells) == len(header), f"{path.name}: a row with {len(cells)} cells: {lines[i]}"
                rows.append(cells)
                i += 1
        else:
            i += 1
    assert rows, f"{path.name} has no table with the columns {header}"
    return rows


def code_spans(text: str) -> list[str]:
    """The contents of the inline code spans of ``text`` (CommonMark: a run of N backticks closes
    at the next run of exactly N)."""
    spans = []
    for m in re.finditer(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", text):
        body = m.group(2)
        if len(body) > 1 and body.startswith(" ") and body.endswith(" "):
            body = body[1:-1]
        spans.append(body)
    return spans


def one_span(cell: str) -> str:
    spans = code_spans(cell)
    assert len(spans) == 1, f"expected one code span in the cell {cell!r}"
    return spans[0]


# --- (a) the config keys ---------------------------------------------------------------------------

def config_fields() -> dict[str, object]:
    """Every leaf field of the job config as ``dotted.key -> default``. The sections (models of
    ``cluster.config`` itself) are walked; a field holding another module's model, as
    ``loss.params`` holds the parameters typed by ``loss.name``, is one key (docs/amm.md has its
    fields). An optional section (``learner.lora``, default null) is a key of its own and its
    fields are keys too, with the defaults they take when the section is given."""
    import types
    import typing

    from pydantic import BaseModel

    from cluster.config import JobConfig

    out: dict[str, object] = {}

    def section(kind: object) -> type[BaseModel] | None:
        ok = isinstance(kind, type) and issubclass(kind, BaseModel) and kind.__module__ == JobConfig.__module__
        return kind if ok else None

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            kind = field.annotation
            optional = [a for a in typing.get_args(kind) if a is not type(None)] \
                if typing.get_origin(kind) in (typing.Union, types.UnionType) else []
            if section(kind):
                walk(kind, f"{prefix}{name}.")
                continue
            out[prefix + name] = field.get_default(call_default_factory=True)
            if len(optional) == 1 and section(optional[0]):
                walk(optional[0], f"{prefix}{name}.")

    walk(JobConfig, "")
    return out


def documented_config() -> list[tuple[str, str]]:
    return [(one_span(key), one_span(default))
            for key, default, _ in tables(DOCS / "configuration.md", ("key", "default", "meaning"))]


def same_value(documented: object, actual: object) -> bool:
    """Equal, and of the same kind: a bool is not a number, an int and a float may stand for each other."""
    if isinstance(documented, bool) or isinstance(actual, bool):
        return documented is actual
    if isinstance(documented, (int, float)) and isinstance(actual, (int, float)):
        return documented == actual
    return type(documented) is type(actual) and documented == actual


def test_the_config_table_lists_every_field_once_and_nothing_else():
    keys = [key for key, _ in documented_config()]
    fields = config_fields()
    twice = sorted({k for k in keys if keys.count(k) > 1})
    missing = sorted(set(fields) - set(keys))
    unknown = sorted(set(keys) - set(fields))
    assert not twice, f"docs/configuration.md lists these keys twice: {twice}"
    assert not missing, f"config fields docs/configuration.md does not list: {missing}"
    assert not unknown, f"docs/configuration.md lists keys cluster/config.py does not have: {unknown}"


def test_the_config_table_gives_each_fields_default():
    fields = config_fields()
    wrong = [f"{key}: documented {text!r}, the code's is {fields[key]!r}"
             for key, text in documented_config()
             if key in fields and not same_value(yaml.safe_load(text), fields[key])]
    assert not wrong, "defaults in docs/configuration.md that are not the code's:\n" + "\n".join(wrong)


# --- (b) the metric families -----------------------------------------------------------------------

def test_the_metric_table_is_the_declared_families_with_their_types_and_labels():
    from services.metrics import FAMILIES, PREFIX, family_samples
    from tests.unit.test_metrics import AMM  # a snapshot that fills every family (test_metrics checks it)

    rows = tables(DOCS / "observability.md", ("metric", "type", "labels", "meaning"))
    documented = {one_span(name): (kind.strip(), set(code_spans(labels))) for name, kind, labels, _ in rows}
    assert len(documented) == len(rows), "docs/observability.md lists a metric twice"
    declared = {}
    for family in FAMILIES:
        found = family_samples(family, AMM)
        assert found, f"the test snapshot gives {family.name} no sample: extend AMM in tests/unit/test_metrics.py"
        declared[PREFIX + family.name] = (family.type, set().union(*(labels.keys() for labels, _ in found)))
    assert sorted(documented) == sorted(declared), "metric names: docs/observability.md against services/metrics.py"
    differ = {name: (documented[name], declared[name]) for name in declared if documented[name] != declared[name]}
    assert not differ, f"(documented type and labels, declared ones) that differ: {differ}"


# --- (c) the error rows ----------------------------------------------------------------------------

ERROR_HEADER = ("input", "what ammd says", "exit", "test")
PLACEHOLDER = r"<[A-Za-z.'][^<>]*>"  # "<f>", "<row n>", "<...>"; not "<= lr"


def user_error_cases() -> set[str]:
    """Every case id of the test_user_errors*.py files: ``test_name`` or ``test_name[param id]``."""
    out: set[str] = set()
    for path in USER_ERRORS_TESTS:
        out |= _cases_of(ast.parse(path.read_text()))
    return out


def _cases_of(tree: ast.Module) -> set[str]:
    cases_by_name = {}
    for node in tree.body:  # module-level dicts of cases: their keys are the parametrize ids
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    cases_by_name[target.id] = [ast.literal_eval(k) for k in node.value.keys]
    out = set()
    for node in tree.body:
        if not (isinstance(node, ast.FunctionDef) and node.name.startswith("test_")):
            continue
        ids = None
        for deco in node.decorator_list:
            if isinstance(deco, ast.Call) and ast.unparse(deco.func).endswith("parametrize"):
                given = {kw.arg: kw.value for kw in deco.keywords}
                if "ids" in given:  # ids=CASES.keys()
                    ids = cases_by_name[ast.unparse(given["ids"]).removesuffix(".keys()")]
                else:  # a list of string values is its own ids
                    ids = ast.literal_eval(deco.args[1])
        out |= {node.name} if ids is None else {f"{node.name}[{i}]" for i in ids}
    return out


def string_constants() -> list[str]:
    """Every string literal of the source packages, the literal parts of f-strings one by one."""
    out = []
    for package in SOURCE_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    out.append(node.value)
    return out


def message_pieces(span: str) -> list[str]:
    """The literal text of a documented message: cut at placeholders, "...", quotes, braces and
    brackets (JSON and lists are built from several literals), trimmed of edge punctuation."""
    pieces = re.split(PLACEHOLDER + r"|\.\.\.|[\"{}\[\]]", span)
    pieces = [p.strip().strip("'\";:,. ") for p in pieces]
    return [p for p in pieces if len(p) >= 3 and re.search(r"[A-Za-z0-9]", p)]


def test_every_user_error_case_has_one_row_and_every_row_names_a_case():
    rows = tables(DOCS / "errors.md", ERROR_HEADER)
    named = [case for row in rows for case in code_spans(row[3])]
    cases = user_error_cases()
    assert len(cases) > 30, f"reading {[p.name for p in USER_ERRORS_TESTS]} found only {sorted(cases)}"
    twice = sorted({c for c in named if named.count(c) > 1})
    assert not twice, f"docs/errors.md names these cases in two rows: {twice}"
    assert not sorted(cases - set(named)), f"cases of test_user_errors.py without a row in docs/errors.md: " \
                                            f"{sorted(cases - set(named))}"
    assert not sorted(set(named) - cases), f"rows of docs/errors.md naming no case of test_user_errors.py: " \
                                            f"{sorted(set(named) - cases)}"


def unmatched(span: str, constants: list[str]) -> list[str]:
    """The pieces of a documented message that no string of the source holds."""
    return [piece for piece in message_pieces(span) if not any(piece in c for c in constants)]


def test_every_documented_message_stands_in_the_source():
    constants = string_constants()
    missing, unchecked = [], []
    for row in tables(DOCS / "errors.md", ERROR_HEADER):
        spans = code_spans(row[1])
        if not any(message_pieces(span) for span in spans) and "the same" not in row[1]:
            unchecked.append(row[0])
        missing += [f"{row[0]}: {piece!r}" for span in spans for piece in unmatched(span, constants)]
    assert not unchecked, f"rows of docs/errors.md with no message text to check: {unchecked}"
    assert not missing, "message text in docs/errors.md that no string of the source holds:\n" + "\n".join(missing)


def test_the_message_check_catches_a_changed_message():
    constants = string_constants()
    assert message_pieces("nothing to resume: <dir> does not exist (check name and output_dir, ...)") == [
        "nothing to resume", "does not exist (check name and output_dir"]
    assert not unmatched("nothing to resume: <dir> does not exist (check name and output_dir, or run "
                         "without --resume to start the job)", constants)
    assert unmatched("nothing to resume: <dir> has vanished into thin air", constants) == [
        "has vanished into thin air"]


# --- (d) the losses and AMM's parameters ------------------------------------------------------------

def resolved_params(loss: str) -> dict:
    """What ``loss.params: {}`` resolves to for ``loss``, as the config reads it: its defaults."""
    from cluster.config import LossConfig

    params = LossConfig(name=loss).params
    fields = getattr(type(params), "model_fields", None)
    if fields is not None:  # a typed model: every field, the defaults included
        return {name: getattr(params, name) for name in fields}
    if dataclasses.is_dataclass(params):
        return dataclasses.asdict(params)
    return dict(params)


def test_the_loss_table_is_the_registry_with_its_defaults():
    from learner.loss_params import loss_names

    rows = tables(DOCS / "amm.md", ("`loss.name`", "`loss.params` and their defaults", "what it computes"))
    documented = {one_span(name): params for name, params, _ in rows}
    assert sorted(documented) == sorted(loss_names()), "loss names: docs/amm.md against learner/loss_params.py"
    wrong = {}
    for name, cell in documented.items():
        if name == "amm":
            continue  # its parameters have a table of their own (the next test)
        given = yaml.safe_load(one_span(cell))
        actual = resolved_params(name)
        if sorted(given) != sorted(actual) or not all(same_value(given[k], actual[k]) for k in actual):
            wrong[name] = (given, actual)
    assert not wrong, f"(documented, resolved) parameters that differ: {wrong}"


def test_the_amm_parameter_table_is_the_defaults_the_loss_resolves_to():
    rows = tables(DOCS / "amm.md", ("param", "default", "meaning"))
    documented = {one_span(name): yaml.safe_load(one_span(default)) for name, default, _ in rows}
    assert len(documented) == len(rows), "docs/amm.md lists an AMM parameter twice"
    defaults = resolved_params("amm")
    assert sorted(documented) == sorted(defaults), "AMM parameters: docs/amm.md against learner/loss_params.py"
    wrong = {k: (documented[k], defaults[k]) for k in defaults if not same_value(documented[k], defaults[k])}
    assert not wrong, f"(documented, actual) AMM defaults that differ: {wrong}"


# --- (e) links, paths and "`Name` in `file.py`" -------------------------------------------------------

TOP_DIRS = ("cluster", "rollout", "learner", "services", "tasks", "bench", "configs", "k8s", "docker",
            "tests", "docs", ".ci")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(path.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    text = re.sub(r"`[^`\n]*`", "", prose(page.read_text()))  # no links inside code
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_relative_link_points_at_an_existing_file_and_heading(page):
    found, broken = links(page), []
    for target in found:
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = page if not file else (page.parent / file).resolve()
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert found or page.name != "README.md", "README.md links nowhere"
    assert not broken, f"{page.name}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_repository_path_named_in_code_exists(page):
    missing = []
    for span in code_spans(prose(page.read_text())):
        path = span.split("::")[0].rstrip("/")
        if (re.fullmatch(r"[\w.-]+(/[\w.-]+)+", path) and path.split("/")[0] in TOP_DIRS
                and "..." not in path and not (ROOT / path).exists()):
            missing.append(span)
    assert not missing, f"{page.name} names paths that do not exist: {missing}"


def defines(path: Path, name: str) -> bool:
    """Whether ``path`` defines ``name`` (a class, function, constant or field); for ``A.b``, both."""
    text = path.read_text()
    return all(re.search(rf"^\s*(?:(?:async\s+)?def|class)\s+{re.escape(part)}\b|^\s*{re.escape(part)}\s*[:=]",
                         text, re.M) for part in name.split("."))


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_name_said_to_be_in_a_module_is_defined_there(page):
    text = prose(page.read_text())
    claims = re.findall(r"`([A-Za-z_][\w.]*)` (?:in|of) `([\w/.-]+\.py)`", text)
    wrong = [f"{name} in {file}" for name, file in claims if (ROOT / file).exists() and not defines(ROOT / file, name)]
    assert not wrong, f"{page.name} places names where they are not defined: {wrong}"


def test_the_module_check_catches_the_old_readme_s_mistake():
    # The README once placed AdversaryClass in learner/amm.py, which only imports it.
    assert defines(ROOT / "learner" / "amm_heads.py", "AdversaryClass")
    assert not defines(ROOT / "learner" / "amm.py", "AdversaryClass")


def test_the_readme_opens_with_the_two_commands_and_stays_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[:2] == ["# ammd", ""] and lines[2] == "```"
    assert lines[3].startswith("make demo ") and lines[4].startswith("make test ") and lines[5] == "```"
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; reference belongs in docs/"
