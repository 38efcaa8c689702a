"""The console entry points: each is the `main` of its module, as `python train.py` and `python -m` run it."""

from importlib.metadata import entry_points

from ddpm_jax import convert, evaluate, sample, training


def test_every_cli_has_a_console_entry_point():
    scripts = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.name.startswith("ddpm-")}
    expected = {"ddpm-train": training.main, "ddpm-sample": sample.main, "ddpm-convert": convert.main,
                "ddpm-evaluate": evaluate.main}
    assert set(scripts) == set(expected)
    for name, main in expected.items():
        assert scripts[name].load() is main, name
