"""The figures that README.md and docs/ quote from committed records, checked against those records.

    python docs/check_numbers.py        # one line per quote that no longer matches its record; exit 1 if any

Each check below names a page and returns what that page must contain, computed from the JSON records the page
cites: a text (a table as the script that made the record prints it; line breaks and runs of spaces count as one
space), or a `quote`: the figures, in order, that the paragraph, list item or table row holding a lead phrase
quotes. A rerun that changes a record changes what the page must hold, so the page fails here until it quotes the
new figures. `make test` runs this (tests/test_docs.py).
"""

import json
import re
import statistics
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))
sys.path.insert(0, str(ROOT / "benchmarks"))

CHECKS: list[tuple[str, object]] = []  # (page, function of the root returning the texts the page must hold)
READ: set[Path] = set()  # every record a check has read


def check(page: str):
    def register(fn):
        CHECKS.append((page, fn))
        return fn

    return register


@cache
def _json(path: Path):
    READ.add(path)
    return json.loads(path.read_text())


def record(root: Path, path: str):
    return _json(root / path)


def folder(root: Path, path: str) -> Path:
    """A folder of records that a script's table function reads itself: each of its JSON files counts as read."""
    READ.update((root / path).glob("*.json"))
    return root / path


@dataclass(frozen=True)
class Quote:
    """Figures a page quotes in prose: the paragraph, list item or table row holding `lead` holds `figures`, in
    this order, each as a whole number (not inside a longer one)."""

    lead: str
    figures: tuple[str, ...]

    def missing(self, page: str) -> str | None:
        blocks = [normalised(b) for b in re.split(r"\n\s*\n|\n(?=\s*(?:- |\| |\d+\. ))", page)]
        block = next((b for b in blocks if normalised(self.lead) in b), None)
        if block is None:
            return f"no paragraph holds {self.lead!r}"
        at = block.index(normalised(self.lead))
        for figure in self.figures:
            found = re.compile(r"(?<![\d.])" + re.escape(figure) + r"(?![\d]|\.\d)").search(block, at)
            if found is None:
                return f"the paragraph of {self.lead!r} does not quote {figure!r} (after {block[at - 40:at][-40:]!r})"
            at = found.end()
        return None


def quote(lead: str, *figures) -> Quote:
    return Quote(lead, tuple(str(f) for f in figures))


def normalised(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def mean(values) -> float:
    return statistics.mean(values)


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


# ---- the checks, page by page ----

# -- README.md --

README = "README.md"


@check(README)
def readme_parity_and_conversion(root):
    forward = max(c["worst"] for name, c in record(root, "docs/parity/worst_errors.json")["concerns"].items()
                  if name.startswith("forward"))
    conversion = record(root, "docs/convert/article_checkpoint.json")
    worst = {re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{c['worst_difference']:.1e}") for c in conversion["conversions"]}
    return [quote("forward passes agree within", re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{forward:.1e}")),
            quote("On an article-size checkpoint", f"{conversion['model']['parameters'] / 1e6:.1f}M",
                  worst.pop() if len(worst) == 1 else "the two conversions differ")]


@check(README)
def readme_speed(root):
    six, amd, fp32 = record(root, INTEL_SIX), record(root, AMD_OBJECTIVES), record(root, H200["fp32"])
    return [quote("**Speed on CPUs**", *(span(runs_medians(root, w)) + "x" for w in BENCH_WORKLOADS),
                  *(f"{bench_ratio(amd, w):.2f}x" for w in BENCH_WORKLOADS),
                  f"{bench_ratio(six, 'train_step', 'JAX / torch.compile'):.2f}x",
                  *(f"{bench_ratio(six, w, 'JAX bf16 / PyTorch eager, autocast bf16'):.2f}x"
                    for w in ("train_step", "forward"))),
            quote("**Speed on a GPU**", fp32["config"]["jax"],
                  *(f"{fp32[f'{w}_ratio_jax_over_torch']:.2f}" for w in ("train_step", "forward", "sample")))]


@check(README)
def readme_train_time(root):
    runs = [record(root, f"docs/perf/train_time_amd_epyc_{i}.json") for i in (1, 2)]
    return quote("The whole `python train.py` process took",
                 *(minutes(r["seconds"]) for r in runs),
                 *(f"{r['median_images_per_s']:.0f}" for r in runs))


@check(README)
def readme_objectives(root):
    data = mean(record(root, f"{OBJECTIVES}/{p.name}")["scoring"]["data_against_data_swd"]
                for p in (root / OBJECTIVES).glob("v+min-snr_seed*.json"))
    return quote("The default run's SWD is", *(f"{mean(objective_swds(root, arm, sampler)) / data:.2f}x"
                                                for arm in ("v+min-snr", "eps") for sampler in (SDE, ODE)))


@check(README)
def readme_length(root):
    return quote("Training past 4,500 steps does not lower SWD",
                 *(f1(mean(length_swds(root, n, SDE))) for n in (4500, 9000)),
                 *(f1(mean(length_swds(root, n, SDE))) for n in (500, 1000, 2000)))


# -- docs/training.md --

OBJECTIVES = "docs/training/objectives"


def objective_swds(root: Path, arm: str, sampler: str, key: str = "swd") -> list[float]:
    """Per training seed (in seed order), the mean over its sample sets of `key`, for one arm and sampler."""
    runs = sorted((record(root, f"{OBJECTIVES}/{p.name}") for p in (root / OBJECTIVES).glob(f"{arm}_seed*.json")),
                  key=lambda r: r["seed"])
    return [mean(s[key] for s in r["scores"][sampler]) for r in runs if r["arm"] == arm]


def spread(values) -> float:
    return max(values) - min(values)


def f1(value: float) -> str:
    return f"{value:.1f}"


SDE, ODE = "sde-dpmsolver++ 20", "dpmsolver++ 20"


@check("docs/training.md")
def objectives_table(root):
    import compare_objectives

    return compare_objectives.table(folder(root, OBJECTIVES))


@check("docs/training.md")
def objectives_default(root):
    vm = {s: objective_swds(root, "v+min-snr", s) for s in (SDE, ODE)}
    eps = {s: objective_swds(root, "eps", s) for s in (SDE, ODE)}
    v = {s: objective_swds(root, "v", s) for s in (SDE, ODE)}
    gains = [mean(eps[s]) - mean(vm[s]) for s in (SDE, ODE)]
    paired = {s: [a - b for a, b in zip(v[s], vm[s])] for s in (SDE, ODE)}
    return quote("The default preset learns v with Min-SNR-5", f1(mean(vm[SDE])), f1(mean(eps[SDE])),
                 f1(mean(vm[ODE])), f1(mean(eps[ODE])), *map(f1, gains), f1(spread(vm[SDE])), f1(spread(eps[SDE])),
                 f1(spread(vm[ODE])), f1(spread(eps[ODE])), *map(f1, paired[SDE] + paired[ODE]),
                 *(f1(mean(v[s]) - mean(vm[s])) for s in (SDE, ODE)), f1(spread(vm[SDE])), f1(spread(vm[ODE])),
                 f1(spread(v[SDE])), f1(spread(v[ODE])))


@check("docs/training.md")
def objectives_deterministic(root):
    def ratio(arm):
        return f"{mean(objective_swds(root, arm, ODE)) / mean(objective_swds(root, arm, SDE)):.2f}x"

    return quote("The deterministic sampler is as good as the stochastic one", ratio("v+min-snr"), ratio("eps"))


@check("docs/training.md")
def objectives_data_ratio(root):
    data = mean(record(root, f"{OBJECTIVES}/{p.name}")["scoring"]["data_against_data_swd"]
                for p in (root / OBJECTIVES).glob("v+min-snr_seed*.json"))

    def ratio(arm, sampler):
        return f"{mean(objective_swds(root, arm, sampler)) / data:.2f}x"

    return quote("1.5x the data-against-data SWD:", ratio("v+min-snr", ODE), ratio("v+min-snr", SDE),
                 ratio("v", ODE), ratio("v", SDE), ratio("eps", ODE), ratio("eps", SDE))

EDM_SAMPLERS = ("euler 20 churn", "heun 9", "heun 5", "heun 18", "heun 9 churn")


@check("docs/training.md")
def objectives_edm(root):
    euler, heun18 = objective_swds(root, "edm", "euler 20 churn"), objective_swds(root, "edm", "heun 18")
    c250_euler = objective_swds(root, "edm+c250", "euler 20 churn")
    default = [x for sampler in (SDE, ODE) for x in objective_swds(root, "v+min-snr", sampler)]
    edm_all = [x for arm in ("edm", "edm+c250") for sampler in EDM_SAMPLERS for x in objective_swds(root, arm, sampler)]
    colours = {(arm, sampler): mean(objective_swds(root, arm, sampler, "colour_w1"))
               for arm in ("edm", "edm+c250") for sampler in EDM_SAMPLERS}
    heun18_colour = colours.pop(("edm", "heun 18"))
    return quote("EDM does not beat the default", f1(mean(euler)), *map(f1, euler), f1(min(c250_euler)),
                 f1(max(c250_euler)), f1(mean(heun18)), *map(f1, heun18),
                 f1(mean(objective_swds(root, "v+min-snr", SDE))), f1(mean(objective_swds(root, "v+min-snr", ODE))),
                 f1(min(default)), f1(max(default)), f1(min(edm_all)), f1(heun18_colour), f1(min(colours.values())),
                 f1(max(colours.values())),
                 f1(mean(objective_swds(root, "v+min-snr", SDE, "colour_w1"))),
                 f1(mean(objective_swds(root, "v+min-snr", ODE, "colour_w1"))))


@check("docs/training.md")
def objectives_c_noise(root):
    one = {sampler: objective_swds(root, "edm", sampler) for sampler in EDM_SAMPLERS}
    c250 = {sampler: objective_swds(root, "edm+c250", sampler) for sampler in EDM_SAMPLERS}
    seed0 = ("euler 20 churn", "heun 9", "heun 18", "heun 9 churn", "heun 5")
    gaps = [abs(c250[sampler][0] - c250[sampler][1]) for sampler in EDM_SAMPLERS]
    return quote("c_noise: the paper's scale 1 is kept",
                 *(f1(x) for sampler in seed0 for x in (one[sampler][0], c250[sampler][0])),
                 *(f1(x) for sampler in EDM_SAMPLERS for x in (one[sampler][1], c250[sampler][1])),
                 f1(min(gaps)), f1(max(gaps)))


@check("docs/training.md")
def objectives_edm_targets(root):
    data = mean(record(root, f"{OBJECTIVES}/{p.name}")["scoring"]["data_against_data_swd"]
                for p in (root / OBJECTIVES).glob("edm*_seed*.json"))
    best_sampler = min(mean(objective_swds(root, arm, sampler)) for arm in ("eps", "v", "x0", "v+min-snr")
                       for sampler in (SDE, ODE))
    per_run = [min(objective_swds(root, arm, sampler)[i] for sampler in EDM_SAMPLERS)
               for arm, seeds in (("edm", 3), ("edm+c250", 2)) for i in range(seeds)]
    heun = [objective_swds(root, "edm", sampler) for sampler in ("heun 5", "heun 9", "heun 18")]
    return quote("EDM's targets were not reached:", f1(min(per_run)), f1(max(per_run)),
                 f"{min(per_run) / best_sampler:.2f}", f"{max(per_run) / best_sampler:.2f}x", f1(best_sampler),
                 f"{min(per_run) / data:.2f}", f"{max(per_run) / data:.2f}x",
                 *(f1(heun[k][seed]) for seed in range(3) for k in range(3)),
                 f1(heun[2][2]), f1(objective_swds(root, "edm", "euler 20 churn")[2]))


@check("docs/training.md")
def objectives_screen(root):
    def first(arm, sampler):
        return f1(objective_swds(root, arm, sampler)[0])

    return quote("Rejected in the screen (seed 0):", first("v+min-snr+offset", SDE), first("v+min-snr+offset", ODE),
                 first("v+min-snr", SDE), first("v+min-snr", ODE), first("eps+min-snr", SDE), first("eps", SDE),
                 first("eps+min-snr", ODE))


def train_time_table(root: Path) -> str:
    """training.md's table of benchmarks/train_time.py's records."""
    rows = ["| record | wall time | median steps/s | median images/s | commit |", "|---|---|---|---|---|"]
    for path in sorted((root / "docs/perf").glob("train_time_*.json")):
        r = record(root, f"docs/perf/{path.name}")
        rows.append(f"| [{path.name}](perf/{path.name}) | {minutes(r['seconds'])} | {r['median_steps_per_s']:.1f} | "
                    f"{r['median_images_per_s']:.0f} | {r['machine']['commit'][:7]} |")
    return "\n".join(rows)


@check("docs/training.md")
def training_time(root):
    return train_time_table(root)


@check("docs/training.md")
def objectives_data_against_data(root):
    data = {f1(record(root, f"{OBJECTIVES}/{p.name}")["scoring"]["data_against_data_swd"])
            for p in (root / OBJECTIVES).glob("*.json")}
    return quote("the data against the data scores", data.pop() if len(data) == 1 else "the records disagree")


LENGTH = "docs/training/length"


def length_points(root: Path) -> dict:
    import training_length

    return training_length.points(folder(root, LENGTH))


def length_swds(root: Path, steps: int, sampler: str) -> list[float]:
    import training_length

    return training_length.swd_per_seed(length_points(root)[steps], sampler)


@check("docs/training.md")
def length_table(root):
    import training_length

    return training_length.table(folder(root, LENGTH))


@check("docs/training.md")
def length_reproduces_objectives(root):
    rerun, original = (record(root, path) for path in (f"{LENGTH}/steps4500_seed0.json",
                                                       f"{OBJECTIVES}/v+min-snr_seed0.json"))
    def scores(r):  # the wall times differ
        return {sampler: [(x["swd"], x["colour_w1"]) for x in sets] for sampler, sets in r["scores"].items()}

    same = (scores(rerun) == scores(original)
            and rerun["training"]["loss_last_600_steps"] == original["training"]["loss_last_600_steps"])
    return "reproduced the objectives study's v + Min-SNR-5 seed 0 run exactly" if same else "(the two records differ)"


@check("docs/training.md")
def length_findings(root):
    steps = list(length_points(root))
    sde = {n: length_swds(root, n, SDE) for n in steps}
    ode = {n: length_swds(root, n, ODE) for n in steps}
    loss = {n: record(root, f"{LENGTH}/steps{n}_seed0.json")["held_out_loss"][-1]["ema"] for n in (4500, 9000)}
    return [quote("**SWD falls steeply to 2,000 steps and stops falling after 4,500.**",
                  *(f1(mean(sde[n])) for n in steps),
                  f1(mean(sde[9000]) - mean(sde[4500])), f1(spread(sde[4500])), f1(mean(ode[4500])),
                  f1(mean(ode[9000])), f1(spread(ode[4500])), f"{loss[4500]:.4f}", f"{loss[9000]:.4f}"),
            quote("**Training seeds differ most early:**", *(f1(spread(sde[n])) for n in (500, 1000, 2000, 4500)))]


@check("docs/training.md")
def length_loss(root):
    r = record(root, f"{LENGTH}/steps4500_seed0.json")
    held = {h["step"]: h for h in r["held_out_loss"]}
    return quote("**The EMA weights lead the raw ones", f"{held[1000]['ema']:.4f}", f"{held[1000]['raw']:.4f}",
                 f"{held[4500]['ema']:.4f}", f"{held[500]['ema']:.4f}", f"{held[2000]['ema']:.4f}",
                 f"{r['training']['loss_last_600_steps']:.4f}")

# -- docs/quality.md --

TRAINERS = "docs/quality/results.json"


def pct_change(a: float, b: float) -> str:
    return f"{(a / b - 1) * 100:+.1f}%"


@check(README)
def readme_trainers(root):
    r = record(root, TRAINERS)
    held, sets = r["held_out_loss"], r["swd_sets"]
    return quote("the JAX trainer and a PyTorch loop over the reference", f"{r['config']['steps']:,}",
                 f"{abs(held['jax'] / held['torch'] - 1) * 100:.1f}%",
                 f"{abs(mean(sets['jax']) / mean(sets['torch']) - 1) * 100:.1f}%")


def trainers_table(root: Path) -> str:
    """quality.md's table of experiments/compare_trainers.py's record."""
    r = record(root, TRAINERS)
    c, sets, colour = r["config"], r["swd_sets"], r["colour"]
    sampler = f"DDIM-{c['sampling_steps']} (eta {c['eta']:g})" if c["sampler"] == "ddim" else "DDPM"
    jax_swd, torch_swd = mean(sets["jax"]), mean(sets["torch"])
    jax_colour, torch_colour = ([x["colour_w1"] for x in colour[k]] for k in ("jax", "torch"))
    loss = r["final_train_loss"]
    return "\n".join([
        f"| default preset with `--prediction eps`, {c['steps']:,} steps, batch {c['batch_size']}, "
        f"{r['machine']['cores']}-core {r['machine']['cpu']} | JAX trainer | PyTorch loop | JAX vs PyTorch |",
        "|---|---|---|---|",
        f"| final training loss (mean of the last {c['steps'] // 5:,} steps) | {loss['JAX']:.4f} | "
        f"{loss['PyTorch']:.4f} | {pct_change(loss['JAX'], loss['PyTorch'])} |",
        f"| held-out loss (EMA; 1,024 fixed image, t, noise triples) | {r['held_out_loss']['jax']:.5f} | "
        f"{r['held_out_loss']['torch']:.5f} | {pct_change(r['held_out_loss']['jax'], r['held_out_loss']['torch'])} |",
        f"| SWD, {len(sets['jax'])} sets of 256 {sampler} samples vs 256 held-out tiles: mean (each set) | "
        f"{f1(jax_swd)} ({', '.join(map(f1, sets['jax']))}) | {f1(torch_swd)} ({', '.join(map(f1, sets['torch']))}) "
        f"| {pct_change(jax_swd, torch_swd)} |",
        f"| SWD, 256 training tiles vs the same held-out tiles (baseline) | {f1(r['swd_data_baseline']['swd'])} | | |",
        f"| colour W1 of the same sets: mean (each set); baseline {colour['baseline']['colour_w1']:.1f} | "
        f"{f1(mean(jax_colour))} ({', '.join(map(f1, jax_colour))}) | "
        f"{f1(mean(torch_colour))} ({', '.join(map(f1, torch_colour))}) | |",
    ])


@check("docs/quality.md")
def quality_trainers_table(root):
    return trainers_table(root)


@check("docs/quality.md")
def quality_trainers_findings(root):
    r = record(root, TRAINERS)
    sets, loss, held = r["swd_sets"], r["final_train_loss"], r["held_out_loss"]
    colours = [mean(x["colour_w1"] for x in r["colour"][k]) for k in ("jax", "torch")]
    first, data = r["swd_jax"]["levels"], r["swd_data_baseline"]["levels"]

    def gap(a, b):
        return f"{abs(a / b - 1) * 100:.1f}%"

    return [quote("The two trainers learn the same thing.", gap(loss["JAX"], loss["PyTorch"]),
                  gap(held["jax"], held["torch"]), gap(mean(sets["jax"]), mean(sets["torch"])),
                  f1(min(sets["torch"])), f1(max(sets["torch"])), f1(min(sets["jax"])), f1(max(sets["jax"])),
                  *map(f1, colours)),
            quote("Neither reaches the data in", f"{mean(sets['jax']) / r['swd_data_baseline']['swd']:.2f}x",
                  f1(first["16"]), f1(data["16"]), f1(first["32"]), f1(data["32"]))]


@check("docs/quality.md")
def quality_metrics(root):
    r = record(root, TRAINERS)
    return [quote("256 training tiles against 256 held-out tiles score", f1(r["swd_data_baseline"]["swd"])),
            quote("Data against data:", f"{r['colour']['baseline']['colour_w1']:.1f}")]


def trainers_samplers_table(root: Path) -> str:
    """quality.md's table of the samplers compare_trainers.py ran on the JAX model (its first sample set)."""
    r = record(root, TRAINERS)
    rows = {k.removeprefix("sampler_"): v for k, v in r.items() if k.startswith("sampler_")}
    rows = dict(sorted(rows.items(), key=lambda kv: (kv[0].startswith("ddpm"), int(kv[0].lstrip("dimp")))))
    ddpm = rows.get("ddpm1000", {}).get("swd")
    lines = ["| sampler (JAX EMA model) | SWD vs held-out | vs DDPM 1000 | wall, 256 images, compile included |",
             "|---|---|---|---|"]
    for name, v in rows.items():
        label = f"DDIM {name.removeprefix('ddim')} steps, eta {r['config']['eta']:g}" if name.startswith("ddim") else \
            "DDPM 1000 steps (the article's sampler)"
        versus = f"{(v['swd'] / ddpm - 1) * 100:+.0f}%" if ddpm and name != "ddpm1000" else ""
        lines.append(f"| {label} | {f1(v['swd'])} | {versus} | {v['seconds']:.0f} s |")
    return "\n".join(lines)


@check("docs/quality.md")
def quality_samplers_table(root):
    return trainers_samplers_table(root)


@check("docs/quality.md")
def quality_samplers_findings(root):
    r = record(root, TRAINERS)
    swd = {n: r[f"sampler_{n}"]["swd"] for n in ("ddim10", "ddim25", "ddim50", "ddim100", "ddpm1000")}
    seconds = {n: r[f"sampler_{n}"]["seconds"] for n in ("ddim50", "ddim100", "ddpm1000")}
    sets = r["swd_sets"]["jax"]
    return quote("From 50 steps on, DDIM at eta 1", f1(swd["ddim50"]), f1(swd["ddim100"]), f1(swd["ddpm1000"]),
                 *(f"{seconds[n]:.0f} s" for n in ("ddim50", "ddim100", "ddpm1000")),
                 f"{(swd['ddim25'] / swd['ddpm1000'] - 1) * 100:.0f}%", f1(swd["ddim25"]), f1(swd["ddim10"]),
                 f1(min(sets)), f1(max(sets)))


BLIND = "docs/quality/blind_check.json"


@check("docs/quality.md")
def quality_blind_check(root):
    import blind_check

    answers = record(root, BLIND)["answers"]
    rating = {name: f1(mean(a["rating"] for a in by.values())) for name, by in answers.items()}
    return [blind_check.table(root / BLIND),
            quote("**The ratings rise with training length**", *(rating[name] for name in list(answers)[1:6]),
                  rating["held-out tiles"]),
            quote("**The reviewers did not tell the two trainers apart**", rating["JAX trainer, eps, 3,000 steps"],
                  *(f"{a['rating']:g}" for a in answers["JAX trainer, eps, 3,000 steps"].values()),
                  *(() if {k: a["rating"] for k, a in answers["JAX trainer, eps, 3,000 steps"].items()}
                    == {k: a["rating"] for k, a in answers["PyTorch loop, eps, 3,000 steps"].items()}
                    else ("(a reviewer rated the two trainers differently)",)))]


@check("docs/training.md")
def length_blind_check(root):
    answers = record(root, BLIND)["answers"]
    lengths = [mean(a["rating"] for a in by.values()) for name, by in answers.items() if "steps, training seed" in name]
    return quote("Three blind reviewers, shown the same samples", f1(min(lengths)), f1(max(lengths)),
                 f1(mean(a["rating"] for a in answers["held-out tiles"].values())))


# -- docs/sampling.md --  (the EDM samplers' table reads the objectives records, as training.md's does)

SAMPLERS_RECORD, SPACINGS_RECORD = "docs/sampling/samplers.json", "docs/sampling/spacings.json"


@check("docs/sampling.md")
def sampling_tables(root):
    import compare_samplers

    return [compare_samplers.table(record(root, SAMPLERS_RECORD), compare_samplers.CONFIGS),
            compare_samplers.table(record(root, SPACINGS_RECORD), compare_samplers.SPACING_CONFIGS)]


def seeds_cell(values: list[float]) -> str:
    return ", ".join(map(f1, values)) + (f" ({f1(mean(values))}, {f1(spread(values))})" if len(values) > 1 else "")


def sampler_sets(root: Path) -> tuple[dict, dict]:
    """The samplers record: each sampler's SWD per set, and its wall time per set (compare_samplers' reading)."""
    import compare_samplers

    r = record(root, SAMPLERS_RECORD)
    keys = [compare_samplers.name(*c) for c in compare_samplers.CONFIGS]
    return ({key: [s["swd"] for s in r[key]["sets"]] for key in keys},
            {key: compare_samplers.seconds_per_set(r[key]["sets"]) for key in keys})


def at_least_20_steps(keys) -> list[str]:
    return [key for key in keys if int(key.split()[1]) >= 20]


@check(README)
def readme_samplers(root):
    swd, seconds = sampler_sets(root)
    means = [mean(swd[key]) for key in at_least_20_steps(swd)]
    return quote("On the default preset's model, every sampler at 20 steps or more",
                 f"{min(means):.1f}-{max(means):.1f}",
                 f"{seconds['ddpm 1000'] / seconds[SDE]:.0f}x")


@check("docs/sampling.md")
def sampling_spacing_findings(root):
    r = record(root, SPACINGS_RECORD)

    def swd(key):
        return mean(x["swd"] for x in r[key]["sets"])

    def colour(key):
        return f"{mean(x['colour_w1'] for x in r[key]['sets']):.2f}"

    trailing = {f1(abs(swd(f"{s} trailing") - swd(s))) for s in (SDE, ODE)}
    return quote("`leading` raised", f1(swd(SDE)), f1(swd(f"{SDE} leading")), f1(swd(ODE)), f1(swd(f"{ODE} leading")),
                 colour(SDE), colour(f"{SDE} leading"), colour(ODE), colour(f"{ODE} leading"),
                 trailing.pop() if len(trailing) == 1 else "trailing moved the two solvers differently")


@check("docs/sampling.md")
def sampling_which_findings(root):
    swd, seconds = sampler_sets(root)
    longer = at_least_20_steps(swd)
    ratio_ode_to_sde = mean(objective_swds(root, "v+min-snr", ODE)) / mean(objective_swds(root, "v+min-snr", SDE))
    widest = max(longer, key=lambda key: spread(swd[key]))
    means = {key: mean(values) for key, values in swd.items()}
    return [quote("**Every sampler at 20 steps or more scores alike", f1(min(means[k] for k in longer)),
                  f1(max(means[k] for k in longer)), f1(spread(swd[widest])), f1(means[SDE]), f"{seconds[SDE]:.1f}",
                  f1(means[ODE]), f"{seconds[ODE]:.1f}"),
            quote("**10 steps cost quality:**", f1(means["dpmsolver++ 10"]), f1(means["sde-dpmsolver++ 10"])),
            quote("**The article's DDPM-1000**", f1(means["ddpm 1000"]), f"{seconds['ddpm 1000']:.1f}",
                  f"{seconds['ddpm 1000'] / seconds[SDE]:.0f}x"),
            quote("The order of those two is within the noise",
                  f"{ratio_ode_to_sde:.2f}x"),
            quote("**Deterministic samplers fail on eps models.**", *(f1(mean(objective_swds(root, "eps", sampler)))
                                                                  for sampler in (ODE, SDE)))]


@check("docs/sampling.md")
def sampling_edm_table(root):
    from compare_objectives import network_calls

    rows = ["| model | sampler | network calls | training seeds | SWD per training seed (mean, range) | colour W1 |",
            "|---|---|---|---|---|---|"]
    models = [("EDM", "edm", EDM_SAMPLERS), ("EDM, c_noise scale 250", "edm+c250", EDM_SAMPLERS),
              ("v + Min-SNR-5 (the default)", "v+min-snr", (SDE, ODE))]
    shown = {SDE: "SDE-DPM-Solver++ 20", ODE: "DPM-Solver++ (ODE) 20"}
    for label, arm, samplers in models:
        seeds = ", ".join(str(r["seed"]) for r in sorted(
            (record(root, f"{OBJECTIVES}/{p.name}") for p in (root / OBJECTIVES).glob(f"{arm}_seed*.json")),
            key=lambda r: r["seed"]) if r["arm"] == arm)
        for sampler in samplers:
            rows.append(f"| {label} | {shown.get(sampler, sampler)} | {network_calls(sampler)} | {seeds} | "
                        f"{seeds_cell(objective_swds(root, arm, sampler))} | "
                        f"{f1(mean(objective_swds(root, arm, sampler, 'colour_w1')))} |")
    return "\n".join(rows)


@check("docs/sampling.md")
def sampling_edm_findings(root):
    euler, heun18 = objective_swds(root, "edm", "euler 20 churn"), objective_swds(root, "edm", "heun 18")
    heun9, heun9_churn = objective_swds(root, "edm", "heun 9"), objective_swds(root, "edm", "heun 9 churn")
    default = [x for sampler in (SDE, ODE) for x in objective_swds(root, "v+min-snr", sampler)]
    colours = {(arm, sampler): mean(objective_swds(root, arm, sampler, "colour_w1"))
               for arm in ("edm", "edm+c250") for sampler in EDM_SAMPLERS}
    heun18_colour = colours.pop(("edm", "heun 18"))
    return [quote("Euler with churn is EDM's best row by the mean:", f1(mean(euler)), f1(mean(heun18)), f1(euler[2]),
                  f1(heun18[2]), *(f1(x) for pair in zip(heun9_churn, heun9) for x in pair)),
            quote("No EDM sampler reaches the default's samples:", f1(min(default)), f1(max(default)),
                  f1(heun18_colour), f1(min(colours.values())), f1(max(colours.values())),
                  f1(mean(objective_swds(root, "v+min-snr", SDE, "colour_w1"))),
                  f1(mean(objective_swds(root, "v+min-snr", ODE, "colour_w1"))))]


# -- docs/parity.md --

PARITY = "docs/parity/worst_errors.json"


def parity_worst(root: Path, *concerns: str) -> str:
    """The worst error over the record's `concerns`, as docs/parity.md writes it: 2.4e-7, 0."""
    worst = max(record(root, PARITY)["concerns"][c]["worst"] for c in concerns)
    mantissa, exponent = f"{worst:.1e}".split("e")
    return "0" if worst == 0 else f"{mantissa}e{int(exponent)}"


def parity_row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


@check("docs/parity.md")
def parity_made_by(root):
    r = record(root, PARITY)
    versions = ", ".join(f"{name} {version}" for name, version in r["versions"].items())
    return [f"made on a {r['machine']['cores']}-core {r['machine']['cpu']} ({versions}) by:", r["command"]]


@check("docs/parity.md")
def parity_tolerances(root):
    def w(*concerns):
        return parity_worst(root, *concerns)

    return [
        parity_row("schedules (betas in float64; 7 float32 coefficients), T in 1, 2, 10, 50, 100, 1000", "1e-7 abs",
                   f"{w('schedule betas (float64)')} / {w('schedule coefficients')}"),
        parity_row("q_sample", "1e-6 rel", w("q_sample")),
        parity_row("losses l2 / l1 (shared x0, t, noise)", "1e-6 rel", f"{w('loss l2')} / {w('loss l1')}"),
        parity_row("forward, 3 U-Nets x 2 configs (dim 8, 16 px; 2 and 4 levels) + TwoResUNet 1 -> 2 channels, 4 "
                   "levels", "1e-5 max abs", w("forward")),
        parity_row("`ddpm-convert`'s own check of its output, both directions (AttentionUNet 1 channel; TwoResUNet via "
                   "`.safetensors`, held to the same limit, is not recorded)",
                   "1e-5 max abs in the tests (the command's limit: 1e-4)", w("forward (ddpm-convert's check)")),
        parity_row("loss gradients, every parameter, 3 U-Nets (l2), TwoResUNet (l1) and TwoResUNet (l2) with every "
                   "depthwise-convolution formulation", "1e-4 rel (max abs err / max abs grad)",
                   w("gradients (per parameter)")),
        parity_row("one DDPM step at t = 0, 500, 999 (shared noise)", "1e-5 abs", w("DDPM step")),
        parity_row("one DDIM step, eta = 0 and 1 (incl. the final step to x0)", "1e-5 abs",
                   w("DDIM step eta=0", "DDIM step eta=1")),
        parity_row("25 chained DDPM steps (shared noise)", "1e-4 abs", w("25 chained DDPM steps")),
        parity_row("whole one-program samplers (DDPM 100 steps, DDIM 10) vs the reference loop, same noise",
                   "1e-4 abs", w("whole ddpm sampler (scan)", "whole ddim sampler (scan)")),
    ]


@check("docs/parity.md")
def parity_diffusers(root):
    types = {"eps": "", "x0": " sample", "v": " v_prediction"}  # diffusers' prediction_type in the concern's name

    def cells(sampler, predictions):
        columns = ("vs diffusers (linear)", "vs float64 (cosine)",
                   "vs diffusers (cosine), beyond diffusers' float32 error")
        return [" / ".join(parity_worst(root, f"{sampler}{types[p]} {column}") for p in predictions)
                for column in columns]

    spacing = "at 10, 20, 50 steps; at 20 also \"leading\" and \"trailing\" spacing (linear)"
    return [
        parity_row(f"DPM-Solver++ (ODE) {spacing}", "eps", *cells("dpmsolver++", ["eps"])),
        parity_row("DPM-Solver++ (ODE) at 20 steps", "x0 / v", *cells("dpmsolver++", ["x0", "v"])),
        parity_row(f"SDE-DPM-Solver++ {spacing}", "eps", *cells("sde-dpmsolver++", ["eps"])),
        parity_row("SDE-DPM-Solver++ at 20 steps", "x0 / v", *cells("sde-dpmsolver++", ["x0", "v"])),
        parity_row("DDIM 50, eta 0", "eps / x0 / v", *cells("ddim eta=0", ["eps", "x0", "v"])),
        parity_row("DDIM 50, eta 1", "eps / x0 / v", *cells("ddim eta=1", ["eps", "x0", "v"])),
        parity_row("DDPM, all steps of T = 100", "eps / x0 / v", *cells("ddpm", ["eps", "x0", "v"])),
        quote("Cosine: why a float64 reference", parity_worst(root, "dpmsolver++ vs float64 (cosine)")),
    ]


@check("docs/parity.md")
def parity_training_targets(root):
    losses = [c for c in record(root, PARITY)["concerns"] if c.startswith("loss ") and c.endswith(" vs float64")]
    return [
        parity_row("the v target, sqrt(abar) eps - sqrt(1 - abar) x0, against `DDPMScheduler.get_velocity` (linear, "
                   "cosine)", "1e-6 rel", parity_worst(root, "v target vs diffusers get_velocity")),
        parity_row("Min-SNR-5 weights per target (eps, x0, v) against the formula in float64 from the schedule's abar",
                   "1e-6 (each weight's ratio)",
                   parity_worst(root, "min-SNR-5 weights vs float64 (each weight's ratio)")),
        parity_row("the loss of each target, unweighted (x0, v) and Min-SNR-5 (eps, x0, v), against float64 (same "
                   "network output, x0, t, noise)", "1e-6 rel", parity_worst(root, *losses)),
    ]


@check("docs/parity.md")
def parity_edm(root):
    table_1 = [f"edm {c} vs Table 1 (float64)" for c in ("c_skip", "c_out", "c_in", "c_noise", "loss weight")]
    return [
        parity_row("c_skip, c_out, c_in, c_noise (scale 1 and 250), lambda(sigma), 101 sigmas in [0.002, 80]",
                   "Table 1 in float64", "1e-6 rel", parity_worst(root, *table_1)),
        parity_row("the training loss (log-normal sigma, noise and lambda replayed from the key)", "eq. 2 in float64",
                   "1e-6 rel", parity_worst(root, "edm training loss vs the paper (float64)")),
        parity_row("Karras noise levels, 2 to 40 steps", "eq. 5 in float64 / `EDMEulerScheduler.sigmas`",
                   "1e-12 / 1e-6 rel", f"{parity_worst(root, 'karras sigmas vs eq. 5 (float64)')} / "
                                       f"{parity_worst(root, 'karras sigmas vs diffusers')}"),
        parity_row("Euler, 18 steps, no churn and the paper's churn (S_churn 40, S_tmin 0.05, S_tmax 50, S_noise "
                   "1.003); 10 steps, S_churn 5", "`EDMEulerScheduler` (`sigma_schedule=\"karras\"`), same x_T and "
                   "churn noise", "1e-5 abs", parity_worst(root, "edm euler vs diffusers EDMEulerScheduler",
                                                            "edm euler churn vs diffusers EDMEulerScheduler")),
        parity_row("Heun, 18 steps with and without the paper's churn (c_noise scale 1); 10 steps and 5 with S_churn 2 "
                   "(scale 250)", "Algorithm 2 in float64", "1e-5 abs",
                   parity_worst(root, "edm heun vs Algorithm 2 (float64)", "edm heun churn vs Algorithm 2 (float64)")),
    ]


# -- docs/convert.md --

CONVERT = "docs/convert/article_checkpoint.json"


@check("docs/convert.md")
def convert_checkpoint(root):
    r = record(root, CONVERT)
    m, machine = r["model"], r["machine"]
    texts = [f"U-Net ({m['variant']} dim {m['dim']}, dim_mults {','.join(map(str, m['dim_mults']))}, "
             f"{m['parameters'] / 1e6:.1f}M parameters, seeded random weights;",
             f"on a {machine['cores']}-core {machine['cpu']}, by `{r['command']}`"]
    if "note" in machine:  # a shared machine: the page says so and quotes no wall time
        texts.append("Other jobs were running on the machine, so the wall times the record holds are those of a "
                     "shared machine and are not quoted here.")
    return texts


@check("docs/convert.md")
def convert_table(root):
    def short(x):  # 1.8e-06 as the page writes it: 1.8e-6
        return re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{x:.1e}")

    return [f"| `{c['command']}` | {short(c['worst_difference'])} |" for c in record(root, CONVERT)["conversions"]]


# -- docs/performance.md and docs/perf/ --

PERF = "docs/performance.md"
INTEL_RUNS = [f"docs/perf/bench_cpu_intel_fp32_run{i}.json" for i in (1, 2, 3, 4)]
INTEL_SIX = "docs/perf/bench_cpu_intel.json"
AMD_OBJECTIVES = "docs/perf/bench_cpu_amd_epyc_objectives.json"
AMD_SEQUENTIAL = "docs/perf/bench_cpu_amd_epyc_sequential.json"
H200 = {"fp32": "docs/perf/bench_gpu_h200_fp32_sequential.json",
        "bf16": "docs/perf/bench_gpu_h200_bf16_sequential.json"}
CONV_PATHS = "docs/perf/conv_paths_intel.json"
BENCH_WORKLOADS = ("train_step", "forward", "sample_1000")


def bench_row(rec: dict, workload: str, label: str = "JAX / PyTorch eager") -> dict:
    return next(r for r in rec["ratios"] if r["workload"] == workload and r["label"] == label)


def bench_ratio(rec: dict, workload: str, label: str = "JAX / PyTorch eager") -> float:
    return bench_row(rec, workload, label)["ratio"]["median"]


def ratio_text(ratio: dict) -> str:
    return f"{ratio['median']:.2f} ({ratio['min']:.2f}-{ratio['max']:.2f})"


def span(values, fmt=".2f") -> str:
    return f"{min(values):{fmt}}-{max(values):{fmt}}"


def pct(x: float) -> str:
    return f"{abs(x) * 100:.0f}%"


def intel_runs(root):
    return [record(root, p) for p in INTEL_RUNS]


def runs_medians(root, workload):
    return [bench_ratio(r, workload) for r in intel_runs(root)]


def runs_spreads(root):
    """Per workload, how far the four runs' medians differ: max / min - 1."""
    return [max(m) / min(m) - 1 for m in (runs_medians(root, w) for w in BENCH_WORKLOADS)]


def table_lines(md: str) -> str:
    return "\n".join(line for line in md.splitlines() if line.startswith("|"))


@check(PERF)
def perf_versions(root):
    def one(paths, get):
        values = {json.dumps(get(record(root, p)), sort_keys=True) for p in paths}
        return json.loads(values.pop()) if len(values) == 1 else {"jax": "the records disagree"}

    cpu = one(INTEL_RUNS + [INTEL_SIX, AMD_OBJECTIVES], lambda r: r["machine"]["versions"])
    gpu = one(H200.values(), lambda r: {"jax": r["config"]["jax"], "torch": r["config"]["torch"]})
    return [quote("The CPU records are from", cpu["jax"], cpu["flax"], cpu["torch"], cpu["python"], gpu["jax"],
                  gpu["torch"]),
            quote("`docs/perf/bench_gpu_h200_fp32_sequential.json`: article config", gpu["torch"], gpu["jax"])]


@check(PERF)
def perf_intel_runs_table(root):
    runs = intel_runs(root)
    names = {"train_step": "train step", "forward": "forward", "sample_1000": "DDPM sampling"}
    lines = ["| JAX / PyTorch eager, fp32 | " + " | ".join(f"run {i}" for i in range(1, len(runs) + 1)) + " |",
             "|---|" + "---|" * len(runs),
             "| alternating rounds | " + " | ".join(str(r["rounds"]) for r in runs) + " |"]
    lines += [f"| {names[w]} | " + " | ".join(ratio_text(bench_row(r, w)["ratio"]) for r in runs) + " |"
              for w in BENCH_WORKLOADS]
    for who, key in (("PyTorch eager's", "peer_seconds"), ("JAX's", "jax_seconds")):
        lines.append(f"| {who} train step, s | " + " | ".join(f"{bench_row(r, 'train_step')[key]:.3f}" for r in runs)
                     + " |")
    return "\n".join(lines)


@check(PERF)
def perf_intel_runs_summary(root):
    torch_step = [bench_row(r, "train_step")["peer_seconds"] for r in intel_runs(root)]
    spreads = runs_spreads(root)
    return [quote("PyTorch's own train step took", *(f"{s:.3f}" for s in torch_step),
                  pct(max(torch_step) / min(torch_step) - 1), f"{min(spreads) * 100:.0f}-{pct(max(spreads))}"),
            quote("Over the four runs the medians are", *(span(runs_medians(root, w)) for w in BENCH_WORKLOADS),
                  *map(pct, spreads)),
            quote("The forward ratios of the four runs are", span(runs_medians(root, "forward")),
                  span(runs_medians(root, "sample_1000")))]


@check(PERF)
def perf_intel_six_peer(root):
    import bench

    six = record(root, INTEL_SIX)
    runs_jax = [bench_row(r, "train_step")["jax_seconds"] for r in intel_runs(root)]
    peers = six["peers"]
    eager, autocast = "JAX / PyTorch eager", "JAX bf16 / PyTorch eager, autocast bf16"
    return [table_lines(bench.markdown(six)),
            quote("The JAX train step's own time was", f"{bench_row(six, 'train_step')['jax_seconds']:.3f}",
                  span(runs_jax, ".3f"), f"{bench_ratio(six, 'train_step'):.2f}"),
            quote("Compiles: torch.compile's first step took", f"{peers['torch.compile']['first_step_seconds']:.0f}",
                  f"{peers['torch.compile, autocast bf16']['first_step_seconds']:.0f}",
                  f"{peers['JAX']['compile_seconds']:.1f}", f"{peers['JAX bf16']['compile_seconds']:.1f}",
                  f"{peers['JAX']['compile_seconds_cached']:.1f}",
                  f"{peers['JAX bf16']['compile_seconds_cached']:.1f}"),
            quote("PyTorch's autocast runs oneDNN's AMX kernels", *(
                f"{bench_row(six, w, eager)['peer_seconds'] / bench_row(six, w, autocast)['peer_seconds']:.1f}x"
                for w in ("train_step", "forward")))]


@check("docs/perf/bench_cpu_intel.md")
def perf_intel_six_peer_md(root):
    import bench

    return bench.markdown(record(root, INTEL_SIX))


@check("docs/perf/bench_cpu_amd_epyc_objectives.md")
def perf_amd_objectives_md(root):
    import bench

    return bench.markdown(record(root, AMD_OBJECTIVES))


def fp32_cached_compiles(root):
    return [record(root, p)["peers"]["JAX"]["compile_seconds_cached"] for p in INTEL_RUNS + [INTEL_SIX]]


@check(PERF)
def perf_targets(root):
    six, amd = record(root, INTEL_SIX), record(root, AMD_OBJECTIVES)
    medians = {w: runs_medians(root, w) for w in BENCH_WORKLOADS}
    train = medians["train_step"]
    spreads = runs_spreads(root)
    return [quote("| train step ≤ 0.8 |", span(train), f"{bench_ratio(six, 'train_step'):.2f}"),
            quote("| forward ≤ 0.8 |", span(medians["forward"]), f"{bench_ratio(six, 'forward'):.2f}"),
            quote("| sampling ≤ 0.8 |", span(medians["sample_1000"]), f"{bench_ratio(six, 'sample_1000'):.2f}"),
            quote("| never above 1.0 on any x86 CPU |", f"{(min(train) - 1) * 100:.0f}-{pct(max(train) - 1)}",
                  pct(bench_ratio(six, "train_step") - 1), pct(bench_ratio(amd, "train_step") - 1)),
            quote("| runs within ±10% |", f"{min(spreads) * 100:.0f}-{pct(max(spreads))}",
                  *(pct(bench_ratio(six, w) / mean(medians[w]) - 1) for w in BENCH_WORKLOADS)),
            quote("| cached compile ≤ 5 s |", f"{span(fp32_cached_compiles(root), '.1f')} s",
                  f"{record(root, INTEL_SIX)['peers']['JAX bf16']['compile_seconds_cached']:.1f} s")]


@check(PERF)
def perf_compile_time(root):
    cold = [record(root, p)["peers"]["JAX"]["compile_seconds"] for p in INTEL_RUNS + [INTEL_SIX]]
    return quote("In the five fp32 records on the Intel Xeon", f"{span(cold, '.1f')} s",
                 f"{span(fp32_cached_compiles(root), '.1f')} s")


@check(PERF)
def perf_profile(root):
    """The profile has no JSON: its table is profile_step.py's --md output, committed as
    docs/perf/profile_cpu_intel.md."""
    table = (root / "docs/perf/profile_cpu_intel.md").read_text()
    share = {row.split("|")[1].strip().split(" ")[0]: row.split("|")[3].strip() for row in table.splitlines()
             if row.startswith("| ") and row.split("|")[3].strip().endswith("%")}
    return [table, quote("the depthwise 7x7 convolution (depthwise.py's", share["depthwise"]),
            quote("- layout transposes of weights", share["layout"]),
            quote("- the all-reduce between", share["all-reduce"]),
            quote("- each device repeating the optimizer", share["outside"])]


@check(PERF)
def perf_layers(root):
    rows = record(root, "docs/perf/layers_cpu_amd_epyc.json")["rows"]
    row = next(r for r in rows if r["part"] == "depthwise 7x7" and r["level"] == 0)
    return quote("PyTorch's depthwise backward is slow on CPU", f"{row['shape_BHWC'][1]} px",
                 f"batch {row['shape_BHWC'][0]}", f"{row['torch_fwd_bwd_ms']:.1f} ms",
                 f"{row['jax_fwd_bwd_ms']:.1f} ms")


YNN, EIGEN = "YNNPACK (XLA's default)", "Eigen (training_compiler_options)"


def conv_ms(row, path, kind):
    return row[f"{path} | {kind} ms"]


@check("docs/perf/conv_paths_intel.md")
def perf_conv_paths_md(root):
    """conv_paths.py's table, rendered from its record as the script renders it (the record has no rounds count)."""
    import bench

    rec = record(root, CONV_PATHS)
    cfg, names = rec["config"], (YNN, EIGEN)
    head = (f"`--config {cfg['name']}`, {rec['devices']} JAX devices (batch {cfg['batch_size'] // rec['devices']} "
            f"each), on {bench.machine_name(rec['machine'])}; ms, medians of")
    lines = ["| input (B, H, W, C) | kernel | count | " + " | ".join(f"{n}: fwd / fwd+bwd" for n in names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for row in rec["rows"]:
        cells = " | ".join(f"{conv_ms(row, n, 'forward'):.2f} / {conv_ms(row, n, 'fwd+bwd'):.2f}" for n in names)
        lines.append(f"| {tuple(row['lhs'])} | {tuple(row['kernel'][:2])} {row['kernel'][2]}->{row['kernel'][3]} "
                     f"| {row['count']} | {cells} |")
    lines.append("| **whole U-Net, per device** | | | " + " | ".join(
        f"**{rec['totals_ms'][n]['forward']:.1f} / {rec['totals_ms'][n]['fwd+bwd']:.1f}**" for n in names) + " |")
    return [head, "\n".join(lines)]


@check(PERF)
def perf_conv_paths(root):
    rec = record(root, CONV_PATHS)
    total = rec["totals_ms"]
    rows = rec["rows"]
    gain = [(r["lhs"][1], r["count"] * (conv_ms(r, YNN, "fwd+bwd") - conv_ms(r, EIGEN, "fwd+bwd"))) for r in rows]
    worse = [r for r in rows if conv_ms(r, EIGEN, "fwd+bwd") > conv_ms(r, YNN, "fwd+bwd")]
    rgb = [r for r in worse if r["lhs"][3] == 3]
    rest = sorted((r for r in worse if r["lhs"][3] != 3), key=lambda r: r["lhs"][1])
    words = {1: "one", 2: "two", 3: "three", 4: "four"}
    return [f"| YNNPACK (XLA's default) | {total[YNN]['forward']:.1f} ms | {total[YNN]['fwd+bwd']:.1f} ms |",
            f"| Eigen | {total[EIGEN]['forward']:.1f} ms | {total[EIGEN]['fwd+bwd']:.1f} ms |",
            quote("Eigen saves", f"{sum(g for _, g in gain):.1f} ms", f"{sum(g for h, g in gain if h == 32):.1f} ms",
                  "32 px", words.get(len(worse), str(len(worse))),
                  *(f"{conv_ms(r, EIGEN, 'fwd+bwd'):.2f}" + (" ms" if i == 0 else "") for i, r in enumerate(rgb)),
                  *(f"{conv_ms(r, YNN, 'fwd+bwd'):.2f}" for r in rgb),
                  *(f"{conv_ms(r, EIGEN, 'forward'):.2f} ms" for r in rgb),
                  *(f"{conv_ms(r, YNN, 'forward'):.2f}" for r in rgb),
                  *(f"{r['lhs'][1]} px" for r in rest),
                  *(f"{conv_ms(r, path, 'fwd+bwd'):.2f}" for r in rest for path in (EIGEN, YNN)))]


@check("docs/perf/decisions.md")
def perf_decisions_conv_paths(root):
    total = record(root, CONV_PATHS)["totals_ms"]
    return quote("the default U-Net's dense convolutions with both gradients", f"{total[EIGEN]['fwd+bwd']:.0f} ms",
                 f"{total[YNN]['fwd+bwd']:.0f} ms")


OBJECTIVE_NAMES = {"v": "v", "x0": "x0", "eps+min-snr": "eps + Min-SNR-5",
                   "v+min-snr+offset": "v + Min-SNR-5 + offset noise 0.1"}


@check(PERF)
def perf_amd_objectives(root):
    rec = record(root, AMD_OBJECTIVES)
    lines = ["| JAX objective | / JAX eps: median (min-max) | / PyTorch eager |", "|---|---|---|",
             f"| eps (the default peer) | 1 | {ratio_text(bench_row(rec, 'train_step')['ratio'])} |"]
    against_eps = []
    for spec, name in OBJECTIVE_NAMES.items():
        peer = f"JAX, objective {spec}"
        eps = bench_row(rec, "train_step", f"{peer} / JAX")["ratio"]
        against_eps.append(eps["median"])
        eager = bench_row(rec, "train_step", f"{peer} / PyTorch eager")["ratio"]
        lines.append(f"| {name} | {ratio_text(eps)} | {ratio_text(eager)} |")
    return ["\n".join(lines),
            quote("Every median is within", f"{-(-max(abs(m - 1) for m in against_eps) * 100 // 1):.0f}%"),
            quote("In the same run JAX's forward took", ratio_text(bench_row(rec, "forward")["ratio"]),
                  ratio_text(bench_row(rec, "sample_1000")["ratio"]))]


@check(PERF)
def perf_amd_sequential(root):
    seq, amd = record(root, AMD_SEQUENTIAL), record(root, AMD_OBJECTIVES)
    keys = ("train_step_ratio_jax_over_torch", "forward_ratio_jax_over_torch", "sample_ratio_jax_over_torch")
    return quote("`docs/perf/bench_cpu_amd_epyc_sequential.json`: train step", *(f"{seq[k]:.2f}" for k in keys),
                 *(f"{bench_ratio(amd, w):.2f}" for w in BENCH_WORKLOADS))


@check(PERF)
def perf_h200(root):
    fp32, bf16 = record(root, H200["fp32"]), record(root, H200["bf16"])
    rows = (("train step", "train_step", "train_step_ratio_jax_over_torch", "{:.3f} s"),
            ("forward", "forward", "forward_ratio_jax_over_torch", "{:.3f} s"),
            ("DDPM sampling, 1000 steps of 16 images", "sample_1000", "sample_ratio_jax_over_torch", "{:.1f} s"))
    lines = ["| workload (H200, article config) | PyTorch eager fp32 | JAX fp32 | JAX / eager | JAX bf16 "
             "| JAX bf16 / eager fp32 (mixed precisions) |", "|---|---|---|---|---|---|"]
    for name, key, ratio, fmt in rows:
        lines.append(f"| {name} | {fmt.format(fp32['seconds']['torch_eager'][key])} | "
                     f"{fmt.format(fp32['seconds']['jax'][key])} | {fp32[ratio]:.2f} | "
                     f"{fmt.format(bf16['seconds']['jax'][key])} | {bf16[ratio]:.2f} |")
    return "\n".join(lines)


# ---- running them ----


def failures(root: Path = ROOT) -> list[str]:
    """One line per text that its page does not contain (or per check that could not read its records)."""
    lines = []
    pages = {}
    for page, fn in CHECKS:
        if page not in pages:
            pages[page] = (root / page).read_text()
        try:
            texts = fn(root)
        except (OSError, KeyError, ValueError) as e:
            lines.append(f"{page}: {fn.__name__}: cannot read its records ({e})")
            continue
        for text in [texts] if isinstance(texts, (str, Quote)) else texts:
            if isinstance(text, Quote):
                if (why := text.missing(pages[page])) is not None:
                    lines.append(f"{page}: {fn.__name__}: {why}")
            elif normalised(text) not in normalised(pages[page]):
                shown = normalised(text)
                lines.append(f"{page}: {fn.__name__}: the page does not quote {shown[:300]!r}"
                             + (" ..." if len(shown) > 300 else ""))
    return lines


def main() -> int:
    lines = failures()
    for line in lines:
        print(line)
    print(f"{len(CHECKS)} checks, {len(lines)} failing")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
