"""docs/check_numbers.py: every figure the pages quote from a committed record matches that record."""

import importlib.util
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_numbers", ROOT / "docs" / "check_numbers.py")
check_numbers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_numbers)


def test_every_quoted_figure_matches_its_record():
    assert check_numbers.CHECKS, "no checks registered"
    assert check_numbers.failures() == []


def test_a_changed_record_fails_the_page_that_quotes_it(tmp_path):
    """Every record a check reads, with its figures changed, fails at least one check: pages and records in a copy
    of the tree, one record at a time with every number in it multiplied by 1.37."""
    for name in ("README.md", "docs"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, tmp_path / name)
    check_numbers._json.cache_clear()
    assert check_numbers.failures(tmp_path) == []
    read = sorted(path.relative_to(tmp_path) for path in check_numbers.READ if path.is_relative_to(tmp_path))
    assert read, "the checks read no record"
    for name in read:
        path = tmp_path / name
        original = path.read_text()
        path.write_text(json.dumps(_bumped(json.loads(original))))
        check_numbers._json.cache_clear()
        assert check_numbers.failures(tmp_path), f"{name}: a changed figure went unnoticed"
        path.write_text(original)
        check_numbers._json.cache_clear()


def _bumped(value):
    """The JSON value with every number in it (ratings and counts too, not booleans) multiplied by 1.37."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value * 1.37
    if isinstance(value, dict):
        return {k: _bumped(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_bumped(v) for v in value]
    return value
