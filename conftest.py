"""`make test` runs the suite in two pytest-xdist processes (`-n 2`); this file gives xdist its units of work. One
unit per test module, except that the trainer's tests from the session's tiny run (that run and its compiled programs
between them) and the parity suite (its eager operations compile once per process) are one unit each. The longest
units go first, longest first, so that the short modules after them fill in on whichever process is free and neither
process is left with a long unit at the end."""

import pytest

_TRAINER = ("tests/test_training.py", "tests/test_robustness.py", "tests/test_without_torch.py")
# The units of a minute or more in one process, longest first (as `pytest --durations=0` ranks them).
_LONGEST_FIRST = {unit: rank for rank, unit in enumerate(
    ["trainer", "parity", "tests/test_training_configs.py", "tests/test_sample.py", "tests/test_gpu_check.py"])}


def _unit(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    if path in _TRAINER:
        return "trainer"
    return "parity" if path.startswith("parity_tests/") else path


def pytest_addoption(parser):
    """Here, not in parity_tests/conftest.py (which writes the record): a plain `pytest` reads options only from the
    conftests it loads at start-up, and that one is not among them."""
    parser.addoption("--parity-record", metavar="PATH",
                     help="write the worst error per parity concern, the machine, the versions and the command "
                          "to PATH (JSON), as docs/parity.md quotes them")


def pytest_collection_modifyitems(items):
    rank = len(_LONGEST_FIRST)  # the rest after them, in file order (the sort is stable)
    items.sort(key=lambda item: _LONGEST_FIRST.get(_unit(item.nodeid), rank))


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist") != "load":  # another --dist was asked for (gpu_check.sh: worksteal on 8 processes)
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Units(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

    config.option.loadscopereorder = False  # in the order above, not by the number of tests
    return Units(config, log)
