"""docs/coverage.md's table is what `python -m mari_fx.testing.coverage` measures now."""
from pathlib import Path

from mari_fx.testing.coverage import coverage_table


def test_docs_coverage_table_is_current():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "coverage.md").read_text()
    table = coverage_table()
    assert table in doc, "docs/coverage.md is stale: regenerate it with `python -m mari_fx.testing.coverage`"
    # every family saves FLOPs at N=1000
    for line in table.splitlines()[2:]:
        ratio = float(line.split("|")[4].strip().rstrip("x"))
        assert ratio > 1.0, line
