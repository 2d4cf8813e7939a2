"""The mutation-testing driver (devtools/mutation.py): operators, deterministic selection, isolation.

No ComfyUI: the operators run on small source samples, and the end-to-end check runs pytest on a
throwaway two-file project in tmp_path.
"""
import ast
import json
import textwrap
from pathlib import Path

import pytest

from devtools import mutation

SAMPLE = textwrap.dedent('''\
    def f(a, b, xs: list[int] = None) -> bool:
        """Docstring: never mutated, nor are annotations."""
        if a < b and not xs:
            return a + 1
        logger.info("no %s", a - b)
        if a > 2 * b:
            logger.warning("a is large")
        for x in xs:
            if x == 0:
                continue
            g(a, b)
        print(f"{a + b}")  # mutation: skip
        return any(x > 1.5 for x in xs)
    ''')

# operator -> every line the operator turns the sample into (each mutant changes exactly one line);
# duplicates listed as often as they occur.
EXPECTED = {
    "compare": {
        "    if (a <= b) and not xs:",
        "        if (x != 0):",
        "    return any((x >= 1.5) for x in xs)",
    },
    "boolean": {
        "    if (a < b or not xs):",
        "    if a < b and (xs):",
    },
    "any_all": {"    return (all((x > 1.5 for x in xs)))"},
    "arithmetic": {"        return (a - 1)"},
    "constant": {
        "        return a + (2)",
        "        return a + (0)",
        "        if x == (1):",
        "        if x == (-1):",
        "    return any(x > (2.5) for x in xs)",
        "    return any(x > 0.0 for x in xs)",
    },
    "statement": ["        pass", "        pass", "            pass"],   # return a + 1, g(a, b); continue
    "arguments": {"        (g(b, a))"},
    "negate": {
        "    if (not (a < b and (not xs))):",
        "        if (not x == 0):",
    },
}


def changed_lines(original: str, mutated: str) -> list[str]:
    before, after = original.splitlines(), mutated.splitlines()
    assert len(before) == len(after), "a mutant must keep the line count (spans are single-line here)"
    return [new for old, new in zip(before, after) if old != new]


@pytest.mark.parametrize("operator", sorted(EXPECTED))
def test_each_operator_makes_exactly_the_expected_one_line_changes(operator):
    mutants = mutation.find_candidates("pkg/sample.py", SAMPLE, operators=[operator])
    produced = []
    for mutant in mutants:
        mutated = mutation.apply_mutant(SAMPLE, mutant)
        ast.parse(mutated)   # every mutant is valid Python
        lines = changed_lines(SAMPLE, mutated)
        assert len(lines) == 1, (mutant, lines)
        produced.append(lines[0])
        assert mutant.function == "f" and mutant.operator == operator
    assert sorted(produced) == sorted(EXPECTED[operator])


def test_statement_drop_keeps_a_multi_line_call_valid():
    source = "def f(x):\n    record(\n        x,\n        1,\n    )\n    return x\n"
    (mutant,) = mutation.find_candidates("m.py", source, operators=["statement"])
    assert (mutant.line, mutant.end_line) == (2, 5)
    assert mutation.apply_mutant(source, mutant) == "def f(x):\n    pass\n    return x\n"


def test_spans_are_byte_offsets_so_non_ascii_text_before_them_is_kept():
    source = 'def f(x):\n    label = "β—γ"; return x < 2\n'
    (mutant,) = mutation.find_candidates("m.py", source, operators=["compare"])
    assert mutation.apply_mutant(source, mutant) == 'def f(x):\n    label = "β—γ"; return (x <= 2)\n'


def test_descriptions_name_the_change_and_the_enclosing_method():
    source = "class C:\n    def m(self, n):\n        return n - 1\n"
    mutants = mutation.find_candidates("m.py", source, operators=["arithmetic"])
    assert [(m.function, m.description) for m in mutants] == [("C.m", "arithmetic: `n - 1` -> `(n + 1)`")]


def many_candidates() -> list:
    body = "\n".join(f"    if x{i} < {i}:\n        y = x{i} + {i}" for i in range(30))
    return mutation.find_candidates("pkg/big.py", f"def f():\n{body}\n")


def test_selection_is_deterministic_for_a_seed_and_changes_with_it():
    candidates = many_candidates()
    first = mutation.select_mutants(candidates, 20, seed=11, module="pkg/big.py")
    again = mutation.select_mutants(list(reversed(candidates)), 20, seed=11, module="pkg/big.py")
    other = mutation.select_mutants(candidates, 20, seed=12, module="pkg/big.py")
    assert len(first) == 20 and len(set(first)) == 20
    assert first == again   # the candidates' order does not matter, only the seed
    assert first != other


def test_selection_takes_the_operators_in_turn_and_a_smaller_budget_is_a_subset():
    candidates = many_candidates()
    operators = {m.operator for m in candidates}
    small = mutation.select_mutants(candidates, len(operators), seed=3, module="pkg/big.py")
    large = mutation.select_mutants(candidates, 40, seed=3, module="pkg/big.py")
    assert {m.operator for m in small} == operators   # one of each before any second one
    assert set(small) <= set(large)
    assert mutation.select_mutants(candidates, 10_000, seed=3, module="pkg/big.py") == candidates


def write_project(root: Path, test_imports_module: bool = True) -> None:
    (root / "tests").mkdir(parents=True)
    (root / "calc.py").write_text(
        "def clamp(x, lo, hi):\n    if x < lo:\n        return lo\n    if x > hi:\n        return hi\n    return x\n")
    body = ("from calc import clamp\n\n\ndef test_clamp():\n"
            "    assert clamp(-1, 0, 5) == 0\n    assert clamp(9, 0, 5) == 5\n    assert clamp(3, 0, 5) == 3\n")
    if not test_imports_module:
        body = "def test_nothing():\n    assert 1 + 1 == 2\n"
    (root / "tests" / "test_calc.py").write_text(body)


def test_mutants_run_in_a_copy_and_the_source_tree_is_never_written(tmp_path):
    project = tmp_path / "project"
    write_project(project)
    module_file = project / "calc.py"
    before = (module_file.read_bytes(), module_file.stat().st_mtime_ns)
    config = mutation.Config(seed=1, timeout_factor=5.0, timeout_floor_s=60.0, pytest_args=[], modules=[])
    # Two mutants (the operators are drawn in turn: one comparison, one dropped statement) keep this
    # at four pytest runs with the baseline and the canary.
    module = mutation.ModuleConfig(path="calc.py", tests=["tests/test_calc.py"], mutants=2)
    with mutation.Workspace(project, jobs=1) as workspace:
        report = mutation.run_module(workspace, project, module, config, None, 1, lambda message: None)
        base = workspace.base
        assert base.exists() and not str(base).startswith(str(project))
    assert not base.exists()   # copies removed
    assert (module_file.read_bytes(), module_file.stat().st_mtime_ns) == before
    assert sorted(p.name for p in project.rglob("*")) == ["calc.py", "test_calc.py", "tests"]
    # `<=` / `>=` at a bound returns the bound either way (survives); a dropped `return` changes
    # clamp's result (killed).
    statuses = {m.operator: r.status for m, r in report.results}
    assert statuses == {"compare": "survived", "statement": "killed"}


def test_tests_that_do_not_import_the_module_are_refused(tmp_path):
    project = tmp_path / "project"
    write_project(project, test_imports_module=False)
    config = mutation.Config(seed=1, timeout_factor=5.0, timeout_floor_s=60.0, pytest_args=[], modules=[])
    module = mutation.ModuleConfig(path="calc.py", tests=["tests/test_calc.py"], mutants=2)
    with mutation.Workspace(project, jobs=1) as workspace:
        with pytest.raises(mutation.ConfigError, match="do not import this file"):
            mutation.run_module(workspace, project, module, config, None, 1, lambda message: None)


def test_copy_links_the_environments_and_leaves_out_caches(tmp_path):
    project = tmp_path / "project"
    write_project(project)
    for folder in (".venv/bin", ".git/objects", "tests/__pycache__"):
        (project / folder).mkdir(parents=True)
    copy = mutation.make_copy(project, tmp_path / "copy")
    assert (copy / ".venv").is_symlink() and (copy / ".venv").resolve() == (project / ".venv").resolve()
    assert not (copy / ".git").exists() and not (copy / "tests" / "__pycache__").exists()
    assert (copy / "calc.py").read_text() == (project / "calc.py").read_text()


def test_config_names_every_missing_path(tmp_path):
    write_project(tmp_path)
    config = tmp_path / "mutation.toml"
    config.write_text('[[module]]\npath = "calc.py"\ntests = ["tests/test_calc.py"]\n\n'
                      '[[module]]\npath = "probes/dataset.py"\ntests = ["tests/test_gone.py"]\n')
    with pytest.raises(mutation.ConfigError, match=r"probes/dataset\.py, tests/test_gone\.py"):
        mutation.load_config(config, tmp_path)
    config.write_text('[defaults]\nseed = 5\n\n[[module]]\npath = "calc.py"\ntests = ["tests/test_calc.py"]\n')
    loaded = mutation.load_config(config, tmp_path)
    assert loaded.seed == 5 and [m.path for m in loaded.modules] == ["calc.py"] and loaded.modules[0].mutants == 40


def test_the_committed_config_and_equivalents_are_valid():
    config = mutation.load_config(mutation.DEFAULT_CONFIG, mutation.ROOT)
    assert config.modules
    configured = {m.path for m in config.modules}
    for entry in mutation.load_equivalents(mutation.DEFAULT_EQUIVALENTS):
        assert entry.module in configured, entry
        assert entry.reason.strip(), entry


def test_equivalents_match_on_module_function_and_change_and_the_line_only_when_given(tmp_path):
    source = "def f(n):\n    return n - 1\n"
    (mutant,) = mutation.find_candidates("m.py", source, operators=["arithmetic"])
    path = tmp_path / "eq.toml"
    path.write_text('[[equivalent]]\nmodule = "m.py"\nfunction = "f"\n'
                    'mutation = "arithmetic: `n - 1` -> `(n + 1)`"\nreason = "n is always 0"\n\n'
                    '[[equivalent]]\nmodule = "m.py"\nfunction = "f"\nline = 7\n'
                    'mutation = "arithmetic: `n - 1` -> `(n + 1)`"\nreason = "other place"\n')
    anywhere, on_line_7 = mutation.load_equivalents(path)
    assert anywhere.matches(mutant) and not on_line_7.matches(mutant)
    moved = mutation.Mutant(**{**mutant.__dict__, "module": "n.py"})
    assert not anywhere.matches(moved)


def test_report_counts_explains_survivors_and_renders_again_from_its_json(tmp_path):
    source = "def f(n):\n    if n < 0:\n        return 0\n    return n - 1\n"
    compare, arithmetic = (mutation.find_candidates("m.py", source, operators=[op])[0]
                           for op in ("compare", "arithmetic"))
    negate = mutation.find_candidates("m.py", source, operators=["negate"])[0]
    report = mutation.ModuleReport("m.py", ["tests/test_m.py"], 9, 1.0, 30.0, [
        (compare, mutation.RunResult("survived", 2.0)),
        (arithmetic, mutation.RunResult("survived", 2.0)),
        (negate, mutation.RunResult("killed", 1.0, "FAILED tests/test_m.py::test_f")),
    ])
    equivalents = [mutation.Equivalent("m.py", "f", compare.description, "f(0) is 0 either way")]
    config = mutation.Config(seed=4, timeout_factor=3.0, timeout_floor_s=30.0, pytest_args=[], modules=[])
    text = mutation.render_report([report], equivalents, config, "bench/mutation.toml", 60.0, 1)
    assert "| `m.py` | `test_m.py` | 9 | 3 | 1 | 2 | 0 | 1 | 50% | 1.7 |" in text
    assert f"{compare.description} - equivalent: f(0) is 0 either way" in text
    assert f"{arithmetic.description} - **not explained**" in text
    data = mutation.reports_to_json([report], 4, 60.0, 1)
    (again,) = mutation.reports_from_json(json.loads(json.dumps(data)))
    assert again == report
    assert mutation.render_report([again], equivalents, config, "bench/mutation.toml", 60.0, 1) == text


def test_a_mutant_that_stops_the_tests_from_loading_is_killed(tmp_path):
    """tests/conftest.py imports the whole pack: a mutant (or the canary) that raises on import makes
    pytest exit 4 before any test runs. That is a detection; for the unmutated source it is a
    configuration error."""
    project = tmp_path / "project"
    write_project(project)
    (project / "tests" / "conftest.py").write_text("import sys\nsys.path.insert(0, '.')\nimport calc  # noqa\n")
    (project / "calc.py").write_text("from __future__ import annotations\n" + (project / "calc.py").read_text()
                                     + "raise RuntimeError('broken on import')\n")
    result = mutation.run_tests(project, ["tests/test_calc.py"], [], 60.0)
    assert result.status == "killed" and "broken on import" in result.detail
    with pytest.raises(mutation.ConfigError, match="pytest exit 4"):
        mutation.run_tests(project, ["tests/test_calc.py"], [], 60.0, mutated=False)
