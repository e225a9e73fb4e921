"""Issue 14's structural rules hold for the package: `scripts/check_structure.py` finds nothing."""

from pathlib import Path

import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parent.parent


def _checker():
    return load_script("scripts/check_structure.py")


def test_no_long_module_no_long_function_no_import_cycle():
    assert _checker().violations(ROOT / "sparse_lens") == []


def test_the_checker_sees_a_cycle_through_a_lazy_import_and_a_long_function(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from pkg import a\n" + "    x = 1\n" * 60)
    problems = _checker().violations(pkg)
    assert any("function f of 62 lines" in p for p in problems)
    assert any(p.startswith("import cycle: pkg.a -> pkg.b; pkg.b -> pkg.a") for p in problems)
    (pkg / "b.py").write_text("def f():\n    return 1\n")
    assert _checker().violations(pkg) == []


@pytest.mark.parametrize("module", ["a", "b"])
def test_the_checker_counts_module_lines(tmp_path, module):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / f"{module}.py").write_text("x = 1\n" * 401)
    assert _checker().violations(pkg) == [f"{pkg / (module + '.py')}: module of 401 lines (> 400)"]
