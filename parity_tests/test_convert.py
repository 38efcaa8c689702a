"""Conversion round trips for every checkpoint format: torch -> flax -> torch is bit-exact."""

import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import ddpm_torch
from ddpm_jax import load_model
from ddpm_jax.cli import convert_main as main
from ddpm_jax.convert import ConversionError, to_torch_state
from ddpm_torch import DiffusionModel
from parity_tests.conftest import check

ARCHITECTURES = [
    ("OneResUNet", dict(dim=8, dim_mults=(1, 2, 4))),
    ("TwoResUNet", dict(dim=16, dim_mults=(1, 2))),
    ("AttentionUNet", dict(dim=8, init_dim=8, out_dim=1, dim_mults=(1, 2, 3), channels=1)),
]


def _unet(variant, seed=0, **kwargs):
    torch.manual_seed(seed)
    return ddpm_torch.UNETS[variant](**kwargs)


def _saved(unet, path):
    torch.save(unet.state_dict(), path)
    return path


def _assert_same_weights(expected: dict, actual: dict):
    assert list(actual) == list(expected) or set(actual) == set(expected)
    for key, value in expected.items():
        got = actual[key]
        got = got.numpy() if hasattr(got, "numpy") else got
        assert got.shape == tuple(value.shape), key
        assert np.array_equal(got, value.numpy()), f"{key} changed in the round trip"


def _trainer_checkpoint(variant, kwargs):
    """The article trainer's checkpoint layout, with EMA weights that differ from the raw ones."""
    raw, ema = _unet(variant, 0, **kwargs), _unet(variant, 1, **kwargs)
    model = DiffusionModel(raw, 16, timesteps=10)
    ema_state = {f"ema_model.{k}": v for k, v in DiffusionModel(ema, 16, timesteps=10).state_dict().items()}
    ema_state.update(initted=torch.tensor(True), step=torch.tensor(100))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4).state_dict()
    return {"step": 100, "model": model.state_dict(), "opt": opt, "ema": ema_state, "version": "1.0"}, raw, ema


@pytest.mark.parametrize("variant,kwargs", ARCHITECTURES)
def test_plain_state_dict_round_trip_and_inference(tmp_path, variant, kwargs):
    unet = _unet(variant, **kwargs)
    torch.save(unet.state_dict(), tmp_path / "unet.pt")
    model, config = load_model(tmp_path / "unet.pt")
    assert type(model).__name__ == variant
    for name, value in kwargs.items():
        assert getattr(config, name) == (tuple(value) if name == "dim_mults" else value), name
    back = {k: torch.from_numpy(v) for k, v in to_torch_state(model).items()}
    fresh = ddpm_torch.UNETS[variant](**kwargs)
    fresh.load_state_dict(back, strict=True)
    _assert_same_weights(unet.state_dict(), fresh.state_dict())


@pytest.mark.parametrize("variant,kwargs", ARCHITECTURES[1:2])
def test_diffusion_model_state_dict(tmp_path, variant, kwargs):
    unet = _unet(variant, **kwargs)
    torch.save(DiffusionModel(unet, 16, timesteps=50).state_dict(), tmp_path / "diffusion.pt")
    _assert_same_weights(unet.state_dict(), to_torch_state(load_model(tmp_path / "diffusion.pt")[0]))


@pytest.mark.parametrize("variant,kwargs", ARCHITECTURES)
def test_article_trainer_checkpoint_ema_and_raw(tmp_path, variant, kwargs):
    checkpoint, raw, ema = _trainer_checkpoint(variant, kwargs)
    torch.save(checkpoint, tmp_path / "model-37.pt")
    _assert_same_weights(ema.state_dict(), to_torch_state(load_model(tmp_path / "model-37.pt")[0]))
    _assert_same_weights(raw.state_dict(), to_torch_state(load_model(tmp_path / "model-37.pt", ema=False)[0]))


def _verified(out: str) -> float:
    """The worst difference `ddpm-convert` printed for its check of the converted weights."""
    line = next(line for line in out.splitlines() if line.startswith("verified:"))
    return float(re.search(r"at most (\S+) on random inputs", line).group(1))


def test_cli_to_flax_then_to_torch_is_bit_exact_and_verified(tmp_path, capsys):
    variant, kwargs = ARCHITECTURES[2]
    checkpoint, _, ema = _trainer_checkpoint(variant, kwargs)
    torch.save(checkpoint, tmp_path / "trainer.pt")
    assert main(["to-flax", str(tmp_path / "trainer.pt"), str(tmp_path / "flax")]) == 0
    assert (tmp_path / "flax" / "model.json").is_file()
    # The directory's model computes what the reference computes: the command ran both on random inputs.
    check("forward (ddpm-convert's check)", _verified(capsys.readouterr().out), 0.0, 1e-5)
    assert main(["to-torch", str(tmp_path / "flax"), str(tmp_path / "back.pt")]) == 0
    check("forward (ddpm-convert's check)", _verified(capsys.readouterr().out), 0.0, 1e-5)
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    fresh = ddpm_torch.UNETS[variant](**kwargs)
    fresh.load_state_dict(back, strict=True)
    _assert_same_weights(ema.state_dict(), fresh.state_dict())


def test_safetensors_both_ways_bit_exact_without_pickle(tmp_path, monkeypatch, capsys):
    """to-torch writes a .safetensors the reference loads strictly; to-flax and load_model read it; no pickle is
    read or written on the way (torch.save/load and pickle's entry points fail if called)."""
    import pickle

    from safetensors.torch import load_file

    from ddpm_jax.checkpoints import save_model

    variant, kwargs = ARCHITECTURES[1]
    unet = _unet(variant, **kwargs)
    model, config = load_model(_saved(unet, tmp_path / "unet.pt"))
    save_model(model, config, tmp_path / "flax")

    def no_pickle(*args, **kwargs):
        raise AssertionError("pickle used")

    for owner, name in ((torch, "save"), (torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "dump"),
                        (pickle, "dumps")):
        monkeypatch.setattr(owner, name, no_pickle)
    assert main(["to-torch", str(tmp_path / "flax"), str(tmp_path / "unet.safetensors")]) == 0
    assert main(["to-flax", str(tmp_path / "unet.safetensors"), str(tmp_path / "back")]) == 0
    verified = [_verified(out) for out in capsys.readouterr().out.split("wrote ")[1:]]
    assert len(verified) == 2 and max(verified) <= 1e-5
    monkeypatch.undo()
    fresh = ddpm_torch.UNETS[variant](**kwargs)
    fresh.load_state_dict(load_file(tmp_path / "unet.safetensors"), strict=True)
    _assert_same_weights(unet.state_dict(), fresh.state_dict())
    _assert_same_weights(unet.state_dict(), to_torch_state(load_model(tmp_path / "back")[0]))
    _assert_same_weights(unet.state_dict(), to_torch_state(load_model(tmp_path / "unet.safetensors")[0]))


def test_a_bf16_safetensors_file_loads_as_float32(tmp_path):
    """numpy has no bfloat16: such a file (as hubs hold) is read through safetensors.torch."""
    from safetensors.torch import save_file

    unet = _unet("TwoResUNet", dim=8, dim_mults=(1, 2))
    half = {k: v.to(torch.bfloat16) for k, v in unet.state_dict().items()}
    save_file(half, tmp_path / "unet.safetensors")
    model, _ = load_model(tmp_path / "unet.safetensors")
    _assert_same_weights({k: v.float() for k, v in half.items()}, to_torch_state(model))


def test_a_truncated_safetensors_file_is_a_clear_error(tmp_path, capsys):
    from safetensors.torch import save_file

    save_file(_unet("TwoResUNet", dim=8, dim_mults=(1, 2)).state_dict(), tmp_path / "unet.safetensors")
    data = (tmp_path / "unet.safetensors").read_bytes()
    (tmp_path / "unet.safetensors").write_bytes(data[: len(data) // 2])
    assert main(["to-flax", str(tmp_path / "unet.safetensors"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'unet.safetensors'}: is not a readable safetensors file")
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_a_failed_check_names_the_file_and_fails(tmp_path, monkeypatch, capsys):
    """Weights that convert without error but compute something else (here: one bias changed on the way out)
    fail the check with exit 1; --no-verify skips it. verify() itself sees a change of 1e-3 in one weight."""
    from ddpm_jax import convert

    unet = _unet("TwoResUNet", dim=8, dim_mults=(1, 2))
    model, _ = load_model(_saved(unet, tmp_path / "unet.pt"))
    assert convert.verify(model, unet) <= 1e-5
    with torch.no_grad():
        unet.final_conv.bias += 1e-3
    assert convert.verify(model, unet) == pytest.approx(1e-3, rel=1e-3)

    to_torch_state = convert.to_torch_state
    monkeypatch.setattr(convert, "to_torch_state", lambda m: {
        k: v + (k == "final_conv.bias") for k, v in to_torch_state(m).items()})
    out = tmp_path / "wrong.safetensors"
    assert main(["to-torch", str(tmp_path / "unet.pt"), str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out}: with the converted weights, the Flax U-Net and the PyTorch reference "
                          "differ by up to 1.00e+00") and "--no-verify" in err and out.is_file()
    assert main(["to-torch", str(tmp_path / "unet.pt"), str(out), "--no-verify"]) == 0


def test_mismatches_are_listed_together(tmp_path):
    state = _unet("TwoResUNet", dim=8, dim_mults=(1, 2)).state_dict()
    del state["mid_block1.in_conv.bias"]
    del state["ups.1.2.bias"]
    state["extra.weight"] = torch.zeros(3)
    state["final_conv.bias"] = torch.zeros(5)
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(ConversionError) as info:
        load_model(tmp_path / "broken.pt")
    message = str(info.value)
    assert "broken.pt" in message
    for key in ("mid_block1.in_conv.bias", "ups.1.2.bias", "extra.weight", "final_conv.bias: checkpoint (5,)"):
        assert key in message


# How a reference U-Net is saved from inside each wrapper, and the prefix every key of the U-Net gets.
WRAPPERS = {
    "DataParallel": (lambda unet: torch.nn.DataParallel(unet), "module.", "DataParallel / DistributedDataParallel"),
    "torch.compile": (lambda unet: torch.compile(unet), "_orig_mod.", "torch.compile"),
    "DiffusionModel of a compiled U-Net": (lambda unet: DiffusionModel(torch.compile(unet), 8, timesteps=10),
                                           "_orig_mod.", "torch.compile"),
}


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch.compile's
@pytest.mark.parametrize("wrapper,suffix", [(wrapper, suffix) for wrapper in list(WRAPPERS)[:2]
                                             for suffix in (".pt", ".safetensors")] + [(list(WRAPPERS)[2], ".pt")])
def test_wrapper_prefixes_are_stripped_with_a_one_line_note(tmp_path, wrapper, suffix):
    """DataParallel / DDP and torch.compile prefix every key; to-flax and ddpm-sample read such a file and say so."""
    from safetensors.torch import save_file

    from ddpm_jax.cli import sample_main

    wrap, prefix, who = WRAPPERS[wrapper]
    unet = _unet("OneResUNet", dim=8, dim_mults=(1,))
    wrapped = wrap(unet)
    state = wrapped.state_dict()
    inner = "model." if isinstance(wrapped, DiffusionModel) else ""
    assert {k for k in state if k.startswith(inner)} == {inner + prefix + k for k in unet.state_dict()}
    path = tmp_path / f"wrapped{suffix}"
    (torch.save if suffix == ".pt" else save_file)(state, path)
    note = re.escape(f"{path}: stripped the key prefix {prefix!r} that {who} adds")
    with pytest.warns(UserWarning, match=note) as caught:
        assert main(["to-flax", str(path), str(tmp_path / "flax"), "--no-verify"]) == 0
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    _assert_same_weights(unet.state_dict(), to_torch_state(load_model(tmp_path / "flax")[0]))
    with pytest.warns(UserWarning, match=note):
        assert sample_main(["--checkpoint", str(path), "--num", "1", "--image-size", "8", "--timesteps", "100",
                            "--steps", "2", "--out", str(tmp_path / "sample.png")]) == 0
    assert (tmp_path / "sample.png").is_file()


def test_models_of_one_architecture_keep_their_own_weights(tmp_path):
    """build_model traces an architecture's shapes once per process and hands out copies: a second model loaded
    leaves the first one's weights as they were, and an abstract model built after both is still abstract."""
    import jax
    from flax import nnx

    from ddpm_jax.config import ModelConfig
    from ddpm_jax.unets import build_model

    first, second = (_unet("TwoResUNet", seed, dim=8, dim_mults=(1, 2)) for seed in (0, 1))
    models = [load_model(_saved(unet, tmp_path / f"{k}.pt"))[0] for k, unet in enumerate((first, second))]
    _assert_same_weights(first.state_dict(), to_torch_state(models[0]))
    _assert_same_weights(second.state_dict(), to_torch_state(models[1]))
    abstract = build_model(ModelConfig(variant="TwoResUNet", dim=8, dim_mults=(1, 2)))
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(nnx.state(abstract)))


def test_another_prefix_keeps_the_message_and_names_the_prefix(tmp_path):
    from ddpm_jax.config import ModelConfig
    from ddpm_jax.convert import load_torch_state
    from ddpm_jax.unets import build_model

    unet = _unet("TwoResUNet", dim=8, dim_mults=(1, 2))
    torch.save({f"net.{k}": v for k, v in unet.state_dict().items()}, tmp_path / "net.pt")
    with pytest.raises(ConversionError) as info:
        load_model(tmp_path / "net.pt")
    assert str(info.value) == (
        f"{tmp_path / 'net.pt'}: cannot infer the U-Net architecture, key 'init_conv.weight' is missing (expected a "
        "state_dict of the article's OneResUNet/TwoResUNet/AttentionUNet); every key starts with 'net.'")
    state = {f"net.{k}": v.numpy() for k, v in unet.state_dict().items()}
    with pytest.raises(ConversionError) as info:
        load_torch_state(build_model(ModelConfig(variant="TwoResUNet", dim=8, dim_mults=(1, 2))), state)
    assert "missing keys" in str(info.value) and str(info.value).endswith("every key of state_dict starts with 'net.'")


def test_not_a_unet(tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ConversionError, match="init_conv.weight"):
        load_model(tmp_path / "other.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ConversionError, match="not a PyTorch checkpoint"):
        load_model(tmp_path / "text.pt")
    with pytest.raises(ConversionError, match="no such file"):
        load_model(tmp_path / "missing.pt")


@pytest.mark.parametrize("text", ["not a checkpoint\n", "cat: no such file\n", "[1, 2]\n"])
def test_junk_file_is_not_a_checkpoint_rather_than_refused(tmp_path, text):
    # weights_only=True raises UnpicklingError for these too, as it does for a checkpoint holding code.
    (tmp_path / "bad.pt").write_text(text)
    with pytest.raises(ConversionError, match="is not a PyTorch checkpoint") as info:
        load_model(tmp_path / "bad.pt")
    assert "refused" not in str(info.value)


def test_legacy_format_checkpoint_loads(tmp_path):
    variant, kwargs = ARCHITECTURES[1]
    unet = _unet(variant, **kwargs)
    torch.save(unet.state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    _assert_same_weights(unet.state_dict(), to_torch_state(load_model(tmp_path / "legacy.pt")[0]))


class _Payload:
    def __reduce__(self):
        return (open, ("PAYLOAD_RAN", "w"))


@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, monkeypatch, zip_format):
    monkeypatch.chdir(tmp_path)
    torch.save({"init_conv.weight": _Payload()}, tmp_path / "evil.pt", _use_new_zipfile_serialization=zip_format)
    assert not (tmp_path / "PAYLOAD_RAN").exists()
    with pytest.raises(ConversionError, match="refused"):
        load_model(tmp_path / "evil.pt")
    assert not (tmp_path / "PAYLOAD_RAN").exists()


def test_cli_bad_input_exits_2_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ddpm_jax.convert", "to-flax", str(tmp_path / "missing.pt"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "missing.pt" in result.stderr and "Traceback" not in result.stderr


def test_cli_output_of_the_wrong_kind_is_a_one_line_error(tmp_path, capsys):
    torch.save(_unet("TwoResUNet", dim=8, dim_mults=(1, 2)).state_dict(), tmp_path / "unet.pt")
    out_dir = tmp_path / "existing_dir"
    out_dir.mkdir()
    assert main(["to-torch", str(tmp_path / "unet.pt"), str(out_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out_dir}: is a directory") and "file path" in err and "model.pt" in err
    assert err.count("\n") == 1 and not any(out_dir.iterdir())
    out_file = tmp_path / "existing.txt"
    out_file.write_text("keep me")
    assert main(["to-flax", str(tmp_path / "unet.pt"), str(out_file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out_file}: is a file") and "directory" in err and err.count("\n") == 1
    assert out_file.read_text() == "keep me"


def test_module_run_has_no_runpy_warning_and_public_names_import():
    result = subprocess.run(
        [sys.executable, "-m", "ddpm_jax.convert", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "to-flax" in result.stdout
    assert "RuntimeWarning" not in result.stderr, result.stderr
    code = (
        "import sys, ddpm_jax\n"
        "assert 'ddpm_jax.convert' not in sys.modules\n"
        "from ddpm_jax import load_model, build_model, save_model\n"
        "from ddpm_jax import checkpoints, unets\n"
        "assert load_model is checkpoints.load_model and build_model is unets.build_model\n"
        "assert save_model is checkpoints.save_model\n"
        "assert all(getattr(ddpm_jax, name) is not None for name in ddpm_jax.__all__)\n"
        "ns = {}\n"
        "exec('from ddpm_jax import *', ns)\n"
        "assert set(ddpm_jax.__all__) <= set(ns)\n"
        "try:\n"
        "    ddpm_jax.no_such_name\n"
        "except AttributeError as e:\n"
        "    assert 'no_such_name' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_to_flax_of_a_model_directory_keeps_its_time_embedding_theta(tmp_path, capsys):
    """theta cannot be read off the weights: it comes from the model directory's config, and to-torch says so."""
    from ddpm_jax.config import ModelConfig
    from ddpm_jax.checkpoints import read_model_config, save_model
    from ddpm_jax.convert import load_torch_state
    from ddpm_jax.unets import build_model

    config = ModelConfig(variant="OneResUNet", dim=8, dim_mults=(1, 2), sinusoidal_pos_emb_theta=500)
    state = _unet("OneResUNet", dim=8, dim_mults=(1, 2), sinusoidal_pos_emb_theta=500).state_dict()
    save_model(load_torch_state(build_model(config), {k: v.numpy() for k, v in state.items()}), config,
               tmp_path / "theta500")
    assert main(["to-flax", str(tmp_path / "theta500"), str(tmp_path / "copy")]) == 0
    assert read_model_config(tmp_path / "copy") == config
    assert main(["to-torch", str(tmp_path / "copy"), str(tmp_path / "unet.pt")]) == 0
    assert "build the reference with sinusoidal_pos_emb_theta=500" in capsys.readouterr().out
