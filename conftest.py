"""How `make test` shares the suite between its two pytest-xdist workers (`-n 2 --dist loadgroup`): one group
per test module, except that the trainer's tests (one tiny training run and its compiled programs between them)
and the parity suite (its eager operations compile once per process) each stay in one process. The two big
groups go first, so that the modules after them fill in on whichever worker is free."""

import pytest

_TRAINER = ("test_training.py", "test_robustness.py")


def _group(item) -> str:
    if item.path.name in _TRAINER:
        return "trainer"
    return "parity" if item.path.parent.name == "parity_tests" else item.path.name


def pytest_collection_modifyitems(items):
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_group(item)))
    items.sort(key=lambda item: {"trainer": 0, "parity": 1}.get(_group(item), 2))  # stable: file order within
