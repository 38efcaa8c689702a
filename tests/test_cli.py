"""The command lines: console entry points (cli.py's, which `python train.py` and `python -m` run too) and what
they share."""

import dataclasses
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


PYTHON_FORMATWARNING = warnings.formatwarning  # taken at collection, before any command has replaced it


def test_every_cli_prints_warnings_as_one_line(monkeypatch):
    """Python's format adds the file, line and source line under each message; a CLI prints the message."""
    message = "3 of 40 images were smaller than --image-size 64 and were upscaled"
    for main in (cli.train_main, cli.sample_main, cli.convert_main, cli.evaluate_main):
        monkeypatch.setattr(warnings, "formatwarning", PYTHON_FORMATWARNING)  # each command starts from Python's
        assert warnings.formatwarning(message, UserWarning, "data.py", 412, "    warnings.warn(...)") == (
            f"data.py:412: UserWarning: {message}\n  warnings.warn(...)\n")
        with pytest.raises(SystemExit):
            main(["--help"])
        assert warnings.formatwarning(message, UserWarning, "data.py", 412, "    warnings.warn(...)") == (
            f"warning: {message}\n"), main.__name__
        assert warnings.formatwarning("old flag", DeprecationWarning, "x.py", 1) == (
            "warning: DeprecationWarning: old flag\n")


def _flags_of(monkeypatch, run_class, presets):
    """train_parser and train_config over a stand-in TrainConfig and its presets."""
    from ddpm_jax import config

    monkeypatch.setattr(config, "TrainConfig", run_class)
    monkeypatch.setattr(config, "PRESETS", presets)
    return lambda *argv: cli.train_config(cli.train_parser().parse_args(argv))[0]


def test_a_flag_parses_by_its_declared_type_and_a_bool_is_a_pair_of_switches(monkeypatch, capsys):
    from ddpm_jax.config import _field

    @dataclasses.dataclass(frozen=True)
    class Run:
        ema: bool = _field(True, "keep an EMA of the weights")
        steps: int = _field(10, "optimizer steps")
        lr: float = _field(0.5, "learning rate")
        dim_mults: tuple[int, ...] = _field((1, 2), "width multiplier per level")
        channels: int | None = _field(None, "image channels")

    parse = _flags_of(monkeypatch, Run, {"default": Run(), "article": Run(ema=False)})
    assert parse().ema is True and parse("--preset", "article").ema is False
    assert parse("--no-ema").ema is False and parse("--ema", "--preset", "article").ema is True
    assert parse("--steps", "7", "--lr", "2", "--dim-mults", "1,2,4", "--channels", "1") == Run(
        steps=7, lr=2.0, dim_mults=(1, 2, 4), channels=1)
    assert type(parse("--lr", "2").lr) is float and parse().channels is None
    for argv in (["--ema", "False"], ["--no-ema", "false"], ["--ema=False"], ["--steps", "1.5"]):
        with pytest.raises(SystemExit) as e:  # a bool takes no value: "False" is never read as True
            parse(*argv)
        assert e.value.code == 2, argv
    assert "error:" in capsys.readouterr().err


def test_a_field_of_a_type_without_a_parser_is_refused_when_the_parser_is_built(monkeypatch):
    from ddpm_jax.config import _field

    @dataclasses.dataclass(frozen=True)
    class Run:
        scale: complex = _field(1j, "a complex scale")

    parse = _flags_of(monkeypatch, Run, {"default": Run()})
    with pytest.raises(TypeError, match=r"TrainConfig.scale: its flag needs a parser for <class 'complex'>"):
        parse()
