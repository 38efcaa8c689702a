"""The JAX side without torch (`pip install -e .`): every command in a process where `import torch` fails, as where
torch is not installed; what needs torch says so in one line and exits 2."""

import json
import subprocess
import sys

import numpy as np
import torch
from safetensors.torch import load_file

import ddpm_torch
from ddpm_jax import load_model
from ddpm_jax.convert import to_torch_state
from conftest import TINY, TINY_FLAGS
from test_training import ROOT

# Run in a fresh interpreter: `import torch` (and of any torch.* module) fails as if torch were not installed, every
# ddpm_jax module imports, then each (command, argv) of argv[1] runs in turn; the last line printed is a JSON list
# of what each returned and printed, and whether torch was imported after all.
_WITHOUT_TORCH = """
import contextlib, importlib, io, json, pkgutil, sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoTorch())
import ddpm_jax
for module in pkgutil.walk_packages(ddpm_jax.__path__, "ddpm_jax."):
    importlib.import_module(module.name)
from ddpm_jax import cli
results = []
for command, argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = getattr(cli, command)(argv)
    results.append({"code": code, "out": out.getvalue(), "err": err.getvalue()})
print(json.dumps({"results": results, "torch imported": "torch" in sys.modules}))
"""

INSTALL = 'pip install -e ".[torch]"'


def test_the_jax_side_runs_without_torch_and_what_needs_it_says_so(tmp_path):
    run, st, pt = tmp_path / "run", tmp_path / "unet.safetensors", tmp_path / "theirs.pt"
    torch.manual_seed(0)
    torch.save(ddpm_torch.OneResUNet(8, dim_mults=(1,)).state_dict(), pt)  # the article's format, written where torch is installed
    sample = ["--num", "4", "--out", str(tmp_path / "grid.png")]
    ok = [
        ("train_main", [*TINY_FLAGS, "--steps", "8", "--workdir", str(run)]),  # TINY: the session's programs
        ("sample_main", ["--checkpoint", str(run), *sample, "--out-dir", str(tmp_path / "images")]),
        ("evaluate_main", ["--real", "embedded", "--fake", str(tmp_path / "images"), "--image-size", "16",
                           "--num", "4"]),
        ("convert_main", ["to-torch", str(run), str(st)]),
        ("convert_main", ["to-flax", str(st), str(tmp_path / "flax"), "--prediction", TINY.prediction]),
        ("sample_main", ["--checkpoint", str(st), "--prediction", TINY.prediction, "--image-size", "16",
                         "--timesteps", "100", "--steps", "2", *sample]),
    ]
    needs_torch = [
        ("convert_main", ["to-torch", str(run), str(tmp_path / "unet.pt")]),
        ("convert_main", ["to-flax", str(pt), str(tmp_path / "from_pt")]),
        ("sample_main", ["--checkpoint", str(pt), *sample]),
        ("convert_main", ["to-flax", str(st), str(tmp_path / "verified"), "--verify"]),
    ]
    result = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH, json.dumps(ok + needs_torch)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["torch imported"] is False
    done, refused = report["results"][: len(ok)], report["results"][len(ok) :]

    for (command, argv), r in zip(ok, done):
        assert r["code"] == 0, (command, argv, r)
    assert json.loads(done[2]["out"])["num_fake"] == 4  # evaluate printed its JSON line
    for r in done[3:5]:  # convert wrote, and said in one line that it did not check
        assert [line for line in r["out"].splitlines() if line.startswith("not verified")] == [
            f"not verified: the check runs the PyTorch reference U-Net, and PyTorch is not installed ({INSTALL})"]
    # What was written without torch holds the run's EMA weights: the reference loads the .safetensors strictly,
    # and the model directory made from it has them too.
    expected = to_torch_state(load_model(run)[0])
    ddpm_torch.OneResUNet(8, dim_mults=(1,)).load_state_dict(load_file(st), strict=True)
    for state in (load_file(st), to_torch_state(load_model(tmp_path / "flax")[0])):
        assert state.keys() == expected.keys()
        assert all(np.array_equal(np.asarray(state[k]), v) for k, v in expected.items())

    for (command, argv), r in zip(needs_torch, refused):
        assert r["code"] == 2, (command, argv, r)
        assert r["err"].startswith("error: ") and r["err"].count("\n") == 1 and INSTALL in r["err"], r["err"]
    assert str(tmp_path / "unet.pt") in refused[0]["err"]
    assert str(pt) in refused[1]["err"] and str(pt) in refused[2]["err"]
    assert refused[3]["err"].startswith("error: --verify:")
    assert not any((tmp_path / name).exists() for name in ("unet.pt", "from_pt", "verified"))  # nothing written
