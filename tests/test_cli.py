"""The command lines: console entry points (cli.py's, which `python train.py` and `python -m` run too) and what
they share."""

import warnings
from importlib.metadata import entry_points

import pytest

from ddpm_jax import cli


def test_every_cli_has_a_console_entry_point():
    scripts = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.name.startswith("ddpm-")}
    expected = {"ddpm-train": cli.train_main, "ddpm-sample": cli.sample_main, "ddpm-convert": cli.convert_main,
                "ddpm-evaluate": cli.evaluate_main}
    assert set(scripts) == set(expected)
    for name, main in expected.items():
        assert scripts[name].load() is main, name


def test_every_cli_prints_warnings_as_one_line(monkeypatch):
    """Python's format adds the file, line and source line under each message; a CLI prints the message."""
    message = "3 of 40 images were smaller than --image-size 64 and were upscaled"
    for main in (cli.train_main, cli.sample_main, cli.convert_main, cli.evaluate_main):
        monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # Python's; restored afterwards
        with pytest.raises(SystemExit):
            main(["--help"])
        assert warnings.formatwarning(message, UserWarning, "data.py", 412, "    warnings.warn(...)") == (
            f"warning: {message}\n"), main.__name__
        assert warnings.formatwarning("old flag", DeprecationWarning, "x.py", 1) == (
            "warning: DeprecationWarning: old flag\n")
