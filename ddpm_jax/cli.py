"""Every command of the project: ddpm-train (also `python train.py`), ddpm-sample, ddpm-convert, ddpm-evaluate
(also `python -m ddpm_jax.sample|convert|evaluate`).

One policy for all of them. An error prints as one line, `error: <message>` (with --debug: the traceback), and
the exit code says what kind it was:
    0  done
    1  a run that could not go on (errors.TrainingError: a non-finite loss, a failed save, a busy workdir), or
       converted weights that failed their check (errors.VerificationError)
    2  bad input: a flag, a file, a config (ValueError, OSError; argparse's own usage errors too)
    128 + N  stopped by signal N after saving a checkpoint, as a shell reports a process that N ended
    130  Ctrl-C at any other moment (before the training loop, or in any other command): one line, `interrupted`
Warnings print as one line, `warning: <message>`. Each command imports the modules it needs when it runs.
"""

import argparse
import dataclasses
import json
import os
import signal
import sys
import types
import typing
import warnings
from pathlib import Path

from ddpm_jax.errors import StoppedBySignal, TrainingError, VerificationError


def one_line_warnings() -> None:
    """Warnings print as one line, `warning: <message>`, without the source line Python shows under each: they
    are meant for the user at the terminal."""
    def format_warning(message, category, filename, lineno, line=None):
        kind = "" if category is UserWarning else f"{category.__name__}: "
        return f"warning: {kind}{message}\n"

    warnings.formatwarning = format_warning


def _run(make_parser, command, argv) -> int:
    """Build the parser (`make_parser()`, which imports what its help needs), parse `argv`, run `command(args)`,
    and turn what it raises into the exit code of the policy above."""
    one_line_warnings()
    args = None
    try:
        args = make_parser().parse_args(argv)
        command(args)
    except KeyboardInterrupt:  # Ctrl-C where no signal handler is installed (the training loop has its own)
        if args is not None and args.debug:
            raise
        print("\ninterrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except StoppedBySignal as e:
        print(f"\n{e}", file=sys.stderr)
        return 128 + e.signum  # `train.py && ...` stops, as after a process the signal ended
    except (TrainingError, VerificationError, ValueError, OSError) as e:
        if args is None or args.debug:  # before parsing: an error in building the parser, not the user's
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, (TrainingError, VerificationError)) else 2
    return 0


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return parser


# ----------------------------------------------------------------------------------------------------------
# ddpm-train


def _parse_mults(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(m) for m in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 1,2,4,8") from None


# The parser of each type a TrainConfig field may declare; a bool field is the pair --x / --no-x instead.
_FLAG_PARSERS = {int: int, float: float, str: str, tuple[int, ...]: _parse_mults}


def _flag(field: dataclasses.Field) -> dict:
    """add_argument's keywords for a TrainConfig field's flag, from its declared type without None (`int | None`
    parses ints): a parser of _FLAG_PARSERS, or for a bool --x (True) / --no-x (False), which take no value. Any
    other type is an error here, never a guess at run time."""
    declared = field.type
    if typing.get_origin(declared) in (typing.Union, types.UnionType):
        kinds = [kind for kind in typing.get_args(declared) if kind is not type(None)]
        declared = kinds[0] if len(kinds) == 1 else declared
    if declared is bool:
        return {"action": argparse.BooleanOptionalAction}
    if declared not in _FLAG_PARSERS:
        raise TypeError(f"TrainConfig.{field.name}: its flag needs a parser for {field.type}")
    return {"type": _FLAG_PARSERS[declared]}


def _sampler_help() -> tuple[str, str]:
    """(each sampler and what it does, each family's default sampler): --sampler's help, from diffusion's registry."""
    from ddpm_jax import diffusion

    return ("; ".join(f"{name}: {entry.help}" for name, entry in diffusion.SAMPLERS.items()),
            ", ".join(f"{name} for {family.upper()} models" for family, name in diffusion.DEFAULT_SAMPLERS.items()))


def train_parser() -> argparse.ArgumentParser:
    from ddpm_jax.config import PRESETS, TrainConfig
    from ddpm_jax.validation import CHOICES

    parser = _parser("train.py", "Train the article's DDPM U-Net with JAX on the embedded dataset or an image "
                     "folder. Run it again on the same --workdir to resume from the latest checkpoint.")
    parser.add_argument("--workdir", default=None, help="run folder: config, metrics, samples, checkpoints "
                        "(default: runs/<preset>)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="base config; flags override it. 'article' is the article's 128 px run")

    def shown(value):
        return ",".join(map(str, value)) if isinstance(value, tuple) else "unset" if value is None else value

    samplers, family_defaults = _sampler_help()
    for field in dataclasses.fields(TrainConfig):
        values = {name: shown(getattr(preset, field.name)) for name, preset in PRESETS.items()}
        defaults = (f"default: {values['default']}" if len(set(values.values())) == 1 else
                    "; ".join(f"{name} preset: {value}" for name, value in values.items()))
        # The samplers are diffusion's registry, which config.py (data, without jax) does not import.
        listed = f" (unset: {family_defaults}): {samplers}" if field.name == "sampler" else ""
        choices = CHOICES.get(field.name)
        parser.add_argument("--" + field.name.replace("_", "-"), **_flag(field), default=None,
                            **({"choices": list(choices)} if choices else {}),
                            help=f"{field.metadata['help']}{listed} ({defaults})")
    dist = parser.add_argument_group("multi-host (auto-detected on SLURM and Cloud TPU)")
    dist.add_argument("--coordinator", help="host:port of process 0 for jax.distributed.initialize")
    dist.add_argument("--num-processes", type=int, help="total number of processes")
    dist.add_argument("--process-id", type=int, help="this process's index, 0-based")
    parser.add_argument("--strict", action="store_true", help="stop at the first unreadable file in --data "
                        "(default: skip it with a warning)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar: a line of metrics every --log-every steps instead (also when stdout "
                        "is not a terminal); metrics.jsonl and TensorBoard get them either way")
    return parser


def train_config(args: argparse.Namespace):
    """(TrainConfig, workdir) of parsed train flags: the preset with every given flag replacing its value."""
    from ddpm_jax.config import PRESETS, TrainConfig

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name) is not None}
    if overrides.get("prediction") == "edm":  # EDM's loss is its own: a preset's DDPM weighting does not apply
        overrides.setdefault("loss_weight", "none")
    return dataclasses.replace(PRESETS[args.preset], **overrides), args.workdir or os.path.join("runs", args.preset)


def _train(args: argparse.Namespace) -> None:
    from ddpm_jax import runtime, training

    config, workdir = train_config(args)
    runtime.enable_compilation_cache()
    if not runtime.setup_distributed(args.coordinator, args.num_processes, args.process_id):
        runtime.use_cpu_cores_as_devices(config.batch_size)
    # A progress bar where someone watches; under nohup, SLURM or a pipe, a metrics line every --log-every steps.
    training.train(config, workdir, progress=not args.no_progress and sys.stdout.isatty(), strict=args.strict)


def train_main(argv=None) -> int:
    return _run(train_parser, _train, argv)


# ----------------------------------------------------------------------------------------------------------
# ddpm-sample


def sample_parser() -> argparse.ArgumentParser:
    from ddpm_jax import diffusion
    from ddpm_jax.sample import DEFAULTS
    from ddpm_jax.validation import CHOICES

    parser = _parser("ddpm-sample", "Sample images from any checkpoint: a training workdir, a model directory, a "
                     "torch .pt.")
    parser.add_argument("--checkpoint", required=True, help="a training workdir, a checkpoints/<step> folder, "
                        "a model directory (convert to-flax) or a torch .pt/.pth")
    parser.add_argument("--num", type=int, default=16, help="number of images (default 16)")
    samplers, family_defaults = _sampler_help()
    parser.add_argument("--sampler", help=f"{samplers} (default: the run's, else {family_defaults})")
    parser.add_argument("--steps", type=int, help=f"steps of ddim, the DPM-Solvers and EDM's samplers (default: the "
                        f"run's, else {DEFAULTS.sampling_steps}; ddpm always runs T)")
    parser.add_argument("--eta", type=float, help="DDIM eta in [0, 1]: 0 deterministic, 1 fresh noise at every step "
                        f"(default: the run's, else {DEFAULTS.eta:g})")
    parser.add_argument("--spacing", default="linspace", help=f"{' | '.join(diffusion.SPACINGS)}: where the "
                        "DPM-Solvers' steps fall, as diffusers' timestep_spacing (default linspace)")
    parser.add_argument("--prediction", help=f"{' | '.join(diffusion.PREDICTIONS)}: what the network predicts, for a "
                        ".pt or .safetensors, which records none (default eps, the article's; edm: with the default "
                        "EDM constants); a workdir or model directory records its own")
    edm = parser.add_argument_group("EDM's samplers (euler, heun; Karras et al. 2022, eq. 5 and Algorithm 2)")
    defaults = diffusion.SamplerSettings._field_defaults
    for name, help in (("sigma_min", "the lowest noise level before 0"), ("sigma_max", "the first noise level"),
                       ("rho", "the spacing of the noise levels"),
                       ("s_churn", "fresh noise put back per step (default: the run's, else 0)"),
                       ("s_tmin", "churn only at noise levels from this"), ("s_tmax", "up to this"),
                       ("s_noise", "the std of the churn's noise")):
        shown = "" if name == "s_churn" else f" (default {defaults[name]:g})"
        edm.add_argument("--" + name.replace("_", "-"), type=float, help=help + shown)
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same images")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar, as when stderr is not a terminal (with it, the sampler runs in "
                        "chunks; the images are the same)")
    parser.add_argument("--image-size", type=int, help=f"default: the run's, else {DEFAULTS.image_size}")
    parser.add_argument("--schedule", choices=CHOICES["schedule"], help=f"default: the run's, else {DEFAULTS.schedule}")
    parser.add_argument("--timesteps", type=int, help=f"default: the run's, else {DEFAULTS.timesteps}")
    parser.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw weights, not the EMA")
    parser.add_argument("--out", default="samples.png", help="grid PNG to write (default samples.png)")
    parser.add_argument("--out-dir", help="also write each image as <out-dir>/000000.png, ...")
    return parser


def _sample(args: argparse.Namespace) -> None:
    from PIL import Image

    from ddpm_jax import diffusion, images, runtime
    from ddpm_jax.sample import sample_checkpoint

    # Where the images go is checked before the minutes of sampling, not after.
    out, out_dir = Path(args.out), args.out_dir and Path(args.out_dir)
    if out.suffix.lower() not in Image.registered_extensions() or out.is_dir():
        raise ValueError(f"--out {out}: expected an image file name, e.g. samples.png")
    if out_dir and out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out-dir {out_dir}: expected a folder, not a file")
    runtime.enable_compilation_cache()
    samples = sample_checkpoint(args.checkpoint, args.num, sampler=args.sampler, steps=args.steps, eta=args.eta,
                                seed=args.seed, image_size=args.image_size, schedule=args.schedule,
                                timesteps=args.timesteps, ema=args.ema, spacing=args.spacing,
                                prediction=args.prediction, progress=args.progress and sys.stderr.isatty(),
                                **{name: getattr(args, name) for name in diffusion.EDM_SETTINGS})
    images.save_grid(samples, out)
    if out_dir:
        images.save_images(samples, out_dir)
    print(f"wrote {out}" + (f" and {args.num} images in {out_dir}" if out_dir else ""))


def sample_main(argv=None) -> int:
    return _run(sample_parser, _sample, argv)


# ----------------------------------------------------------------------------------------------------------
# ddpm-convert


def convert_parser() -> argparse.ArgumentParser:
    parser = _parser("ddpm-convert", "Convert U-Net weights between the article's PyTorch checkpoints (.pt, "
                     ".safetensors) and this project's Flax models, then check that both frameworks compute the "
                     "same outputs with them.")
    sub = parser.add_subparsers(dest="command", required=True)
    to_flax = sub.add_parser("to-flax", help="torch checkpoint -> Flax model directory (model.json + Orbax params)")
    to_flax.add_argument("input", help="a .pt/.pth or .safetensors: U-Net or DiffusionModel state_dict, or the "
                         "article trainer's checkpoint (.pt)")
    to_flax.add_argument("output", help="directory to write (created if needed)")
    to_flax.add_argument("--prediction", help="eps | x0 | v | edm: the target the model was trained to predict, "
                         "recorded in model.json (a torch file records none; default eps, the article's; edm records "
                         "the default EDM constants)")
    to_torch = sub.add_parser("to-torch", help="any checkpoint -> a U-Net state_dict (.pt, or .safetensors) for the "
                              "reference model")
    to_torch.add_argument("input", help="a Flax model directory, a training workdir or any file that to-flax accepts")
    to_torch.add_argument("output", help="the file to write: .safetensors for safetensors, else torch.save's format; "
                          "loads with load_state_dict(strict=True)")
    for command in (to_flax, to_torch):
        command.add_argument("--no-ema", dest="ema", action="store_false",
                             help="from a checkpoint with EMA weights, take the raw weights")
        command.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                             help="check what was written: the PyTorch reference U-Net and the Flax U-Net run on "
                             "random inputs with the converted weights, and the command fails if they differ by more "
                             "than 1e-4 (default: check where torch is installed; --verify without it is an error)")
    return parser


def _convert(args: argparse.Namespace) -> None:
    from ddpm_jax import convert, diffusion
    from ddpm_jax.checkpoints import MODEL_JSON, PARAMS_DIR, load_model, recorded_config, save_model
    from ddpm_jax.config import ModelConfig

    out = Path(args.output)
    verify = args.verify
    if verify is None:  # check where torch is installed
        verify = convert.torch_available()
    elif verify and not convert.torch_available():
        raise ValueError(f"--verify: the check runs the PyTorch reference U-Net, and PyTorch is not installed: "
                         f"{convert.INSTALL_TORCH} (or --no-verify)")
    if args.command == "to-flax" and out.exists() and not out.is_dir():
        raise ValueError(f"{out}: is a file; expected a directory for {MODEL_JSON} and {PARAMS_DIR}/")
    if args.command == "to-torch" and out.is_dir():
        raise ValueError(f"{out}: is a directory; expected a file path to write, e.g. {out / 'model.pt'}")
    chosen = getattr(args, "prediction", None)
    recorded = recorded_config(args.input)
    if chosen is not None:
        diffusion.check_prediction(chosen)
        if recorded is not None and recorded.prediction != chosen:
            raise ValueError(f"--prediction {chosen}: {args.input} records a model trained to predict "
                             f"{recorded.prediction}; leave --prediction out")
    model, config = load_model(args.input, ema=args.ema)
    notes = []
    if args.command == "to-flax":
        if recorded is None:
            config = dataclasses.replace(config, prediction=chosen or "eps")
            if chosen is None:
                notes.append("assumed: a torch file records none; --prediction x0|v|edm records another")
        out = save_model(model, config, out)
    else:
        out = convert.write_weights_file(model, out)
        theta = config.sinusoidal_pos_emb_theta
        if theta != ModelConfig.sinusoidal_pos_emb_theta:
            notes.append(f"build the reference with sinusoidal_pos_emb_theta={theta}")
        if diffusion.family(config.prediction) == "edm":
            notes.append(f"an EDM model ({', '.join(f'{k}={v:g}' for k, v in config.edm.items())}): the reference "
                         f"DiffusionModel does not sample it; the file records neither, so sample it with ddpm-sample "
                         f"--prediction edm (default constants) or from the Flax model")
        elif config.prediction != "eps":
            notes.append(f"the file records no target: sample it with ddpm-sample --prediction {config.prediction}; "
                         f"the reference DiffusionModel samples eps models only")
    print(f"wrote {out} ({config.variant}, dim={config.dim}, dim_mults={list(config.dim_mults)}, "
          f"prediction={config.prediction}{''.join('; ' + n for n in notes)})", flush=True)
    if not verify:
        if args.verify is None:
            print(f"not verified: the check runs the PyTorch reference U-Net, and PyTorch is not installed "
                  f"({convert.INSTALL_TORCH})")
        return
    try:
        worst = convert.check_written(out, model, config)
    except VerificationError as e:
        raise VerificationError(f"{e}; --no-verify skips this check") from None
    print(f"verified: the Flax U-Net and the PyTorch reference differ by at most {worst:.1e} on random inputs "
          f"(tolerance {convert.VERIFY_TOLERANCE:g})")


def convert_main(argv=None) -> int:
    return _run(convert_parser, _convert, argv)


# ----------------------------------------------------------------------------------------------------------
# ddpm-evaluate


def evaluate_parser() -> argparse.ArgumentParser:
    from ddpm_jax.images import FLOAT_RANGES

    parser = _parser(
        "ddpm-evaluate",
        "Sliced Wasserstein distance x1e3 (ProGAN, Karras et al. 2018) between two image sets, and "
        "their colour distance (SWD standardises each set, so it cannot see a colour cast). Prints one JSON line: "
        "swd (mean over levels), levels (per resolution), colour_w1 (pixel-value Wasserstein-1 in levels of "
        "0-255, mean over R, G, B), mean_shift (fake minus real mean, per channel), num_real, num_fake, image_size.",
    )
    src = "an image folder, a .npz file (key 'images' or its first array; uint8, or float in --float-range; "
    src += "NHWC or NCHW), or 'embedded' (the built-in dataset)"
    parser.add_argument("--real", required=True, help=f"reference images: {src}")
    parser.add_argument("--fake", required=True, help=f"generated images: {src}")
    parser.add_argument("--image-size", type=int, default=None,
                        help="image side in px; folders are resized to it, .npz files must match it; default: the "
                        "size of the .npz set, else 32 for 'embedded', else the size a folder's images share")
    parser.add_argument("--float-range", choices=list(FLOAT_RANGES), default="0,1",
                        help="value range of float images in .npz files (default 0,1; write --float-range=-1,1)")
    parser.add_argument("--seed", type=int, default=0, help="seed for descriptor positions and projections (default 0)")
    parser.add_argument("--num", type=int, default=None, help="images per set: the first NUM of a folder or .npz; "
                        "for 'embedded' how many to make (default 2048)")
    parser.add_argument("--real-seed", type=int, default=0,
                        help="seed of the embedded dataset for --real embedded (default 0)")
    parser.add_argument("--fake-seed", type=int, default=1, help="seed of the embedded dataset for --fake embedded "
                        "(default 1, so embedded vs embedded measures two independent samples)")
    return parser


def _evaluate(args: argparse.Namespace) -> None:
    from ddpm_jax.evaluate import compare

    print(json.dumps(compare(args.real, args.fake, image_size=args.image_size, num=args.num, seed=args.seed,
                             real_seed=args.real_seed, fake_seed=args.fake_seed, float_range=args.float_range)))


def evaluate_main(argv=None) -> int:
    return _run(evaluate_parser, _evaluate, argv)
