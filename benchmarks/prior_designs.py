"""Latent-design screen (issue "Latent diversity, part 1"): train each candidate design on Fashion-MNIST
for the same wall-clock budget with the committed CLIs, score it with ``kaem-eval`` (classifier-space
FD/KID/precision/recall, the blur ladder, latent health), and write the table ``docs/prior_designs.md``
with a sample grid per design under ``docs/prior_designs/``.

    python benchmarks/prior_designs.py [--minutes 10] [--designs a,b,...] [--n 10000] [--reuse]

Each design is one ``kaem-train --preset fmnist --max-minutes M --seed 0`` command line (printed in the
table), run one after another so each has the machine to itself: run it on an otherwise idle machine.
``--reuse`` keeps finished runs and reports (a crashed or interrupted screen continues where it stopped).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Design:
    key: str
    title: str
    args: tuple[str, ...]  # kaem-train arguments beyond --preset fmnist --max-minutes M --seed 0
    note: str


_CONSTANT_LR = ("--set", "train.lr_schedule=constant")
# IS steps are cheaper than the preset's: --steps 30000 lets them use the whole budget (with a constant lr
# the planned total changes nothing else; the grid refits stop at step 2,000 either way).
_LONG = ("--steps", "30000")
_ISULA = ("--prior", "mixture", "--posterior", "is_ula", "--set", "posterior.step_size=5e-5",
          "--set", "posterior.langevin_steps=5")
_POOL = 1000  # N_s of the tuned resample-move design (5-minute probes: N_s = 100 / 1000 / 3000)
# Every design spells out what it changes, so a row stays true when the preset moves on.
DESIGNS = {d.key: d for d in (
    Design("univariate-is", "paper KART layout (u_p shared over q), IS",
           ("--prior", "univariate", "--posterior", "is", "--set", "posterior.n_samples=100") + _CONSTANT_LR + _LONG,
           "the collapsed schema-1 default (P=20, Q=41, N_s=100, decoder noise on)"),
    Design("a-mixture-is", "(a) mixture prior, IS",
           ("--prior", "mixture", "--posterior", "is", "--set", "posterior.n_samples=100") + _CONSTANT_LR + _LONG,
           "docs/design.md §1.2: Q independent coordinates, 2Q uniforms"),
    Design("b-folded-is", "(b) folded KART (tent fold of u_p + c_qp), IS",
           ("--prior", "folded", "--posterior", "is", "--set", "posterior.n_samples=100") + _CONSTANT_LR + _LONG,
           "P uniforms, every (q, p) reads u_p at its own phase"),
    Design("c-mixture-ula", "(c) mixture prior, ULA posterior in z",
           ("--prior", "mixture", "--posterior", "ula", "--set", "posterior.step_size=1e-4",
            "--set", "posterior.langevin_steps=10") + _CONSTANT_LR + _LONG,
           "chains from prior draws, the domain follows them; η = 1e-4 × 10 moves (at 3e-4, 5 moves from a "
           "trained model's IS start lose ~2,200 nats of data term: too large for this σ = 0.1 posterior)"),
    Design("d-independent-is", "(d) independent uniforms per (q, p), IS",
           ("--prior", "independent", "--posterior", "is", "--set", "posterior.n_samples=100") + _CONSTANT_LR + _LONG,
           "deviation from the paper: u is Q·P = 820 wide"),
    Design("e-mixture-isula", "(e) mixture prior, IS starts + ULA in the prior's noise space",
           _ISULA + ("--set", "posterior.n_samples=100") + _CONSTANT_LR,
           "resample-move (losses.is_ula_loss): 5 ULA moves at η = 5e-5 from a start drawn by importance "
           "weight among N_s = 100 shared proposals"),
    Design(f"f-mixture-isula-{_POOL}", f"(f) = (e) with N_s = {_POOL} proposals for the chain starts",
           _ISULA + ("--set", f"posterior.n_samples={_POOL}") + _CONSTANT_LR,
           f"the same; the starts are the best of {_POOL} (the pool is decoded without gradients, so it costs "
           "little)"),
    Design(f"g-mixture-isula-{_POOL}-slow-prior", "(g) = (f) with the prior at 1/5 of the decoder's lr, cosine lr",
           _ISULA + ("--set", f"posterior.n_samples={_POOL}", "--set", "train.prior_lr_ratio=0.2",
                     "--set", "train.lr_schedule=cosine", "--steps", "8500"),
           "the author's newer configs train the prior 5× slower than the decoder (design.md §10); in (f)'s 30-minute "
           "run the prior kept sharpening after step 4,500 (mean log π of its draws −29 → −5 nats) while the "
           "data term and the generator dimension fell; the lr decays ×0.1 over the planned 8,500 steps"),
    # After the faster step (one prior-energy evaluation per step, per-latent mixture energies, frozen decoder):
    # the same 10 minutes hold ~2x the steps; each cosine is planned over what its step speed fits in 10 minutes.
    Design("i-isula-1000-4800", "(i) = (g) with the cosine over 4,800 steps",
           _ISULA + ("--set", f"posterior.n_samples={_POOL}", "--set", "train.prior_lr_ratio=0.2",
                     "--set", "train.lr_schedule=cosine", "--steps", "4800"),
           "(g)'s configuration at ~8.5 steps/s: 4,800 steps fit 10 minutes"),
    Design("j-isula-3000", "(j) = (i) with N_s = 3,000 proposals",
           _ISULA + ("--set", "posterior.n_samples=3000", "--set", "train.prior_lr_ratio=0.2",
                     "--set", "train.lr_schedule=cosine", "--steps", "3200"),
           "better chain starts at the cost of 3x the forward-only pool decode; at ~4.9 steps/s the budget stopped "
           "it at step 2,927 of the planned 3,200 (lr at ×0.12 of its peak instead of ×0.1)"),
    Design("k-isula-10-moves", "(k) = (i) with 10 ULA moves",
           ("--prior", "mixture", "--posterior", "is_ula", "--set", "posterior.step_size=5e-5",
            "--set", "posterior.langevin_steps=10", "--set", f"posterior.n_samples={_POOL}",
            "--set", "train.prior_lr_ratio=0.2", "--set", "train.lr_schedule=cosine", "--steps", "4200"),
           "chains that move twice as far from their starts; at ~5.8 steps/s the budget stopped it at step 3,457 "
           "of the planned 4,200 (lr at ×0.17)"),
    Design("l-isula-3000-persistent", "(l) = (j) with persistent chains",
           _ISULA + ("--set", "posterior.n_samples=3000", "--set", "posterior.persistent=true",
                     "--set", "train.prior_lr_ratio=0.2", "--set", "train.lr_schedule=cosine", "--steps", "5000"),
           "each image's chain continues where its last visit left it (posterior.persistent); the 3,000-proposal "
           "IS start only on an image's first visit, so after the first epoch (600 steps) a step decodes no "
           "proposals and takes ~115 instead of ~290 ms in one measurement: the cosine is planned over 5,000 steps"),
    Design("m-persistent-fast-prior", "(m) = (l) with the prior at the decoder's learning rate",
           _ISULA + ("--set", "posterior.n_samples=3000", "--set", "posterior.persistent=true",
                     "--set", "train.prior_lr_ratio=1.0", "--set", "train.lr_schedule=cosine", "--steps", "5000"),
           "persistent chains no longer start from prior draws after the first epoch, so the prior must follow "
           "where the chains are (the aggregate posterior) for its samples to land there; (f) showed a fast prior "
           "hurting IS-started chains, whose starts it moves"),
    Design("n-isula-9000-pool", "(n) = (j) with a pool of 9,000 proposals kept between steps, 1,000 fresh per step",
           _ISULA + ("--set", "posterior.n_samples=9000", "--set", "posterior.pool_refresh=1000",
                     "--set", "posterior.pool_finalists=4", "--set", "train.prior_lr_ratio=0.2",
                     "--set", "train.lr_schedule=cosine", "--steps", "3700"),
           "each step decodes 1,000 fresh proposals instead of 3,000; the other 8,000 keep the means decoded when "
           "they were drawn (up to 9 steps old), which only screen: each image's 4 best are decoded again and its "
           "start is drawn among them by exact weights. Planned over 3,700 steps from an isolated timing (~190 "
           "against (j)'s ~238 ms a step); inside kaem-train it ran at (j)'s speed and stopped at step 2,962"),
    Design("o-isula-6000", "(o) = (j) with N_s = 6,000 fresh proposals per step",
           _ISULA + ("--set", "posterior.n_samples=6000", "--set", "train.prior_lr_ratio=0.2",
                     "--set", "train.lr_schedule=cosine", "--steps", "1500"),
           "separates (n)'s two changes: twice (j)'s proposals, all fresh every step as in (j), none reused; the "
           "pool decode doubles (~245 images/s), so the cosine is planned over 1,500 steps"),
)}


def run(cmd: list[str], log: Path) -> None:
    print("$", " ".join(cmd), flush=True)
    with open(log, "w") as fh:
        subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, check=True)


def screen(design: Design, minutes: float, n: int, out: Path, reuse: bool) -> dict:
    run_dir, report = out / design.key, out / f"{design.key}.eval.json"
    if not (reuse and report.is_file()):
        if run_dir.exists():
            shutil.rmtree(run_dir)
        t0 = time.perf_counter()
        run([str(BIN / "kaem-train"), "--preset", "fmnist", "--max-minutes", str(minutes), "--seed", "0",
             "--out", str(run_dir), "--no-progress", *design.args], out / f"{design.key}.train.log")
        print(f"  trained in {time.perf_counter() - t0:.0f} s", flush=True)
        run([str(BIN / "kaem-eval"), "--checkpoint", str(run_dir), "--n", str(n), "--no-progress", "--out",
             str(report)], out / f"{design.key}.eval.log")
    rep = json.loads(report.read_text())
    recs = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    logged = [r for r in recs if "loss" in r]
    budget = next((r for r in recs if r.get("event") == "time_budget"), None)
    last = logged[-1]
    rep["steps"] = budget["step"] if budget else last["step"]
    tail = logged[len(logged) // 2 :]  # the second half of the run: past the first-call warm-up
    rep["images_per_s"] = sum(r["images_per_s"] for r in tail) / len(tail)
    parts = [f"ESS {last['ess']:.2f}" if "ess" in last else "", f"move {last['move']:.2f}" if "move" in last else "",
             f"η {last['eta']:.0e}" if "eta" in last else ""]
    rep["sampler"] = ", ".join(p for p in parts if p)
    return rep


def kept_rows(path: Path, title: str, rerun: list[Design]) -> tuple[list[str], list[str]]:
    """Table rows and notes of this budget's section for the designs not rerun now (a screen of a few designs
    adds its rows to the section instead of replacing it), in DESIGNS order."""
    begin, end = f"<!-- screen: {title} -->", f"<!-- /screen: {title} -->"
    old = path.read_text() if path.exists() else ""
    if begin not in old or end not in old:
        return [], []
    lines = old[old.index(begin) : old.index(end)].splitlines()
    skip = {d.title for d in rerun}
    rows, notes = [], []
    for d in DESIGNS.values():
        if d.title in skip:
            continue
        rows += [ln for ln in lines if ln.startswith(f"| {d.title} | ")]
        notes += [ln for ln in lines if ln.startswith(f"- **{d.title}**: ")]
    return rows, notes


def table(designs: list[Design], reports: dict[str, dict], minutes: float, n: int, grids: str,
          kept: tuple[list[str], list[str]] = ([], [])) -> str:
    """The markdown of one budget's screen: a row per design (``kept``'s first), the blur ladder, the notes."""
    head = (f"Each design: `kaem-train --preset fmnist --max-minutes {minutes:g} --seed 0 ARGS`, alone on this "
            f"2-core machine; scored by `kaem-eval --n {n}` (classifier-space metrics, not FID).\n\n"
            "| design | ARGS | gen. dim ↑ | h ratio ↑ | FD-clf ↓ | KID-clf ↓ | precision ↑ | recall ↑ | sampler | "
            "train img/s | steps | samples |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    rows = list(kept[0])
    for d in designs:
        r = reports[d.key]
        h = r["latent_health"]
        rows.append(f"| {d.title} | `{' '.join(d.args)}` | {h['gen_dim']:.2f} | {h['latent_pr']:.1f} | "
                    f"{r['fd_clf']:.1f} | {r['kid_clf']:.1f} ± {r['kid_clf_std']:.1f} | {r['precision_clf']:.3f} | "
                    f"{r['recall_clf']:.3f} | {r['sampler']} | {r['images_per_s']:.0f} | {r['steps']} | "
                    f"![{d.key}]({grids}/{d.key}-{minutes:g}min.png) |")
    any_rep = next(iter(reports.values()))
    ladder = "\n".join(f"| σ = {g['sigma']:.1f} px | {g['fd_clf']:.1f} | {g['kid_clf']:.1f} | "
                       f"{g['precision_clf']:.3f} | {g['recall_clf']:.3f} |" for g in any_rep.get("blur_ladder", []))
    notes = "\n".join([*kept[1], *(f"- **{d.title}**: {d.note}." for d in designs)])
    return (head + "\n".join(rows) + "\n\nBlur ladder (real training images blurred by σ px vs the same "
            f"test images, n = {n}):\n\n| rung | FD-clf | KID-clf | precision | recall |\n|---|---|---|---|---|\n"
            + ladder + "\n\n" + notes + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="wall-clock training budget per design")
    p.add_argument("--designs", default=",".join(DESIGNS), help=f"comma-separated subset of: {', '.join(DESIGNS)}")
    p.add_argument("--n", type=int, default=10_000, help="generated (and test) images per score")
    p.add_argument("--out", default="runs/designs", help="folder for the runs and their reports")
    p.add_argument("--table", default="docs/prior_designs.md", help="markdown table to write")
    p.add_argument("--reuse", action="store_true", help="keep runs that already have a report")
    args = p.parse_args()
    keys = [k.strip() for k in args.designs.split(",") if k.strip()]
    unknown = [k for k in keys if k not in DESIGNS]
    if unknown:
        p.error(f"unknown designs {unknown}; choose from {', '.join(DESIGNS)}")
    out = ROOT / args.out / f"{args.minutes:g}min"
    out.mkdir(parents=True, exist_ok=True)
    grids = ROOT / Path(args.table).with_suffix("")
    grids.mkdir(parents=True, exist_ok=True)
    reports = {}
    for key in keys:
        reports[key] = screen(DESIGNS[key], args.minutes, args.n, out, args.reuse)
        shutil.copyfile(out / key / "samples.png", grids / f"{key}-{args.minutes:g}min.png")
        r = reports[key]
        print(f"  {key}: FD-clf {r['fd_clf']:.1f}, P {r['precision_clf']:.3f}, R {r['recall_clf']:.3f}, "
              f"gen. dim {r['latent_health']['gen_dim']:.2f}, h ratio {r['latent_health']['latent_pr']:.1f}",
              flush=True)
    title = f"{args.minutes:g} minutes per design"
    designs = [DESIGNS[k] for k in keys]
    text = table(designs, reports, args.minutes, args.n, grids.name, kept_rows(ROOT / args.table, title, designs))
    write_section(ROOT / args.table, title, text)
    print(text)
    return 0


def write_section(path: Path, title: str, body: str) -> None:
    """Replace (or append) this budget's section between its markers; the rest of the file is kept."""
    begin, end = f"<!-- screen: {title} -->", f"<!-- /screen: {title} -->"
    old = path.read_text() if path.exists() else "# Latent designs on Fashion-MNIST\n"
    section = f"{begin}\n## {title}\n\n{body}{end}"
    if begin in old and end in old:
        new = old[: old.index(begin)] + section + old[old.index(end) + len(end) :]
    else:
        new = old.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(new)


if __name__ == "__main__":
    sys.exit(main())
