"""Sampling benchmark: generation images/s of KAEM (inverse-transform prior + decoder, one pass) against
the latent EBM (60-step ULA Langevin prior + decoder) and the VAE (Gaussian prior + decoder), with the
same decoder config, batch size and device, measured side by side in one run; plus the KAEM graph in
onnxruntime (exported with the project's exporter) and the share of KAEM generation time spent in its
prior (docs/design.md §7.3: "re-measure side by side").

    python benchmarks/sampling.py [--preset fmnist] [--batch 64] [--seconds 2] [--threads 1]
                                  [--checkpoint-kaem P] [--checkpoint-vae P] [--checkpoint-lebm P]
                                  [--rounds 4] [--flush-denormal] [--json PATH] [--quick]

Models are freshly initialised from the preset unless a checkpoint is given: speed does not depend on
training except through subnormal floats. KAN decoders evaluate Gaussian RBFs exp(-d²/2), and inputs far
outside the RBF grid (a fresh KAEM's latent sums span ~±7 against the decoder's [-1.2, 1.2]) give
subnormal values that x86 float arithmetic handles many times slower; --flush-denormal flushes them
(torch and onnxruntime) to show how much of a gap that is. Uniforms are the serving ones:
``training.sample.u_for_model(model, range(batch))``. KAEM eager runs ``model.generate(u, lookup=...)``
with the CDF table's bucket lookup built once, as ``kaem-sample`` and the served graph do; "KAEM prior"
times ``model.prior.sample(u, lookup=...)`` alone.
Every cell is timed at batch 1 (latency) and at --batch: warm-up calls, then calls until --seconds per
cell, split into --rounds rounds that visit the cells in turn so background load drifts hit every cell
alike; ms/batch is the median call. onnxruntime runs with its intra-op threads pinned to --threads, like
torch. On a shared machine keep --threads 1: oversubscribed threads slow small ops by up to ~10x (the
load average is printed for that reason).

The targets of the served-graph work are printed as named ratios: ``ort_faster_than_eager`` = KAEM eager
ms / KAEM ORT ms; ``ort_vs_vae`` = KAEM ORT ms / VAE eager ms; ``prior_share_ort`` = onnxruntime
profiler time of the nodes upstream of the decoder's first MatMul / all nodes, with the top ops of the
profile at each batch; and a decoder roofline: FLOPs per image 2·Σ_layers (I·(G+1)·O + I·O), the peak
= the best of 5 ``torch.matmul`` 2048×2048 fp32 at --threads in this run, achieved = FLOPs / the time of
a decoder-only onnxruntime graph ("decoder ORT").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from export.contract import INPUT_U, OUTPUT_IMAGES
from export.to_onnx import ExportError, check_parity, export_graph, ort_session
from training.config import KAEMConfig, get_preset
from training.model.kaem import KAEM, LatentImageModel
from training.model.prior import BucketLookup
from training.model.registry import MODEL_NAMES, build_model
from training.sample import u_for_model

QUICK_PRESET, QUICK_BATCH, QUICK_SECONDS = "digits", 8, 0.2
# Table rows, in order; the test parses these labels.
CELLS = ("KAEM eager", "KAEM prior", "KAEM ORT", "decoder ORT", "latent EBM", "VAE")
MATMUL_OPS = {"MatMul", "FusedMatMul", "Gemm", "MatMulInteger"}
TOP_OPS = 6  # op types printed per batch from the onnxruntime profile
WARMUP_RUNS = 3
MIN_CALLS = 3  # timed calls per cell at least, whatever --seconds says


def time_calls(fn: Callable[[], object], seconds: float, times: list[float]) -> None:
    """Call ``fn`` until ``seconds`` have passed (at least once), appending each call's duration."""
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        times.append(t1 - t0)
        if t1 - start >= seconds:
            return


def no_grad_call(fn: Callable[..., object], *args: object) -> Callable[[], object]:
    """``fn(*args)`` under ``torch.no_grad`` as a zero-argument cell (the latent EBM's ULA chain turns
    gradients back on for its own energy gradients, as in ``kaem-sample``)."""

    def call() -> object:
        with torch.no_grad():
            return fn(*args)

    return call


def warm_up(fn: Callable[[], object], seconds: float) -> None:
    """Two calls at least, then more until a tenth of the cell's budget has passed."""
    start = time.perf_counter()
    for _ in range(2):
        fn()
    while time.perf_counter() - start < 0.1 * seconds:
        fn()


def bench(cells: dict[str, Callable[[], object]], seconds: float, rounds: int) -> dict[str, list[float]]:
    """Per-call times of every cell: ``rounds`` rounds visiting the cells in turn, ``seconds / rounds``
    each, then top-up calls until every cell has MIN_CALLS."""
    times: dict[str, list[float]] = {k: [] for k in cells}
    for fn in cells.values():
        warm_up(fn, seconds)
    for _ in range(rounds):
        for name, fn in cells.items():
            time_calls(fn, seconds / rounds, times[name])
    for name, fn in cells.items():
        while len(times[name]) < MIN_CALLS:
            time_calls(fn, 0.0, times[name])
    return times


def summarise(times: list[float], batch: int) -> dict:
    med = statistics.median(times)
    return {"batch": batch, "calls": len(times), "ms_per_batch": 1000 * med,
            "ms_per_batch_mean": 1000 * statistics.fmean(times), "ms_per_batch_min": 1000 * min(times),
            "images_per_s": batch / med, "seconds_timed": sum(times)}


class _Decoder(torch.nn.Module):
    """The KAEM decoder alone, h[B, Q] -> logits (the roofline's graph)."""

    def __init__(self, model: KAEM):
        super().__init__()
        self.decoder = model.decoder

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(h)


def export_decoder(model: KAEM, path: Path) -> None:
    import warnings

    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(_Decoder(model).eval(), (torch.zeros(4, model.cfg.prior.Q),), dynamo=True,
                                 opset_version=18, dynamic_shapes={"h": {0: batch}}, optimize=True, verbose=False)
    prog.save(str(path))


def decoder_flops_per_image(model: KAEM) -> int:
    """2·Σ_layers (I·K·O + I·O) for KAN layers (K = G+1 RBF basis functions), the multiply-adds of the
    spline and base matmuls; 0 for a conv decoder (no roofline then)."""
    from training.model.kan import KANLayer

    layers = [m for m in model.decoder.modules() if isinstance(m, KANLayer)]
    return sum(2 * (c.shape[0] * c.shape[2] * c.shape[1] + c.shape[0] * c.shape[1])
               for c in (layer.coef for layer in layers))


def matmul_peak_gflops(threads: int, n: int = 2048, reps: int = 5) -> float:
    """The best of ``reps`` fp32 n×n matmuls at ``threads`` torch threads, GFLOP/s."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def _upstream_of_first_matmul(graph) -> set[str]:
    """Names of the nodes upstream of the first MatMul-like node (graph order is topological)."""
    producer = {out: node for node in graph.node for out in node.output}
    first = next((n for n in graph.node if n.op_type in MATMUL_OPS), None)
    if first is None:
        return set()
    seen: set[str] = set()
    stack = list(first.input)
    while stack:
        node = producer.get(stack.pop())
        if node is not None and node.name not in seen:
            seen.add(node.name)
            stack.extend(node.input)
    return seen


def ort_profile(onnx_path: Path, u: np.ndarray, threads: int, flush_denormal: bool, runs: int,
                provider: str = "cpu") -> dict:
    """Profile ``runs`` calls of the graph in onnxruntime (after WARMUP_RUNS left out): kernel time per
    op type, and the share of nodes upstream of the decoder's first MatMul (names from the optimised graph
    onnxruntime actually runs, saved next to the profile)."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        sess = ort_session(onnx_path, threads, flush_denormal, provider=provider, profile_dir=Path(tmp))
        feed = {sess.get_inputs()[0].name: u}
        for _ in range(WARMUP_RUNS + runs):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
        graph = onnx.load(str(Path(tmp) / "optimized.onnx"), load_external_data=False).graph
    # node events inside the timed runs' "model_run" intervals (the warm-up runs allocate and plan)
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[WARMUP_RUNS:]
    upstream = _upstream_of_first_matmul(graph)
    by_op: dict[str, float] = {}
    up_us = total_us = 0.0
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if not any(lo <= e["ts"] <= hi for lo, hi in spans):
            continue
        node = e["name"][: -len("_kernel_time")]
        op = e.get("args", {}).get("op_name", "?")
        by_op[op] = by_op.get(op, 0.0) + e["dur"]
        total_us += e["dur"]
        if node in upstream:
            up_us += e["dur"]
    return {"runs": runs, "node_us_per_run": total_us / runs,
            "op_share": {k: v / total_us for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])} if total_us else {},
            "prior_share_ort": up_us / total_us if total_us else float("nan"), "upstream_nodes": len(upstream)}


def load_models(args: argparse.Namespace) -> tuple[KAEMConfig, dict[str, LatentImageModel], dict[str, str]]:
    """KAEM, VAE and latent EBM: from their checkpoints where given, else fresh from one base config
    (the preset, or the first checkpoint's config when no --preset is given, so decoders match)."""
    from training.checkpoint import load_model

    paths = {"kaem": args.checkpoint_kaem, "vae": args.checkpoint_vae, "lebm": args.checkpoint_lebm}
    loaded: dict[str, LatentImageModel] = {}
    for kind, path in paths.items():
        if path:
            model, _ = load_model(path)
            if model.cfg.model != kind:
                raise SystemExit(f"--checkpoint-{kind} {path} holds a {MODEL_NAMES[model.cfg.model]}, "
                                 f"not a {MODEL_NAMES[kind]}")
            loaded[kind] = model
    if args.preset is not None or not loaded:
        base = get_preset(args.preset or (QUICK_PRESET if args.quick else "fmnist"))
    else:
        base = next(iter(loaded.values())).cfg
    models: dict[str, LatentImageModel] = {}
    sources: dict[str, str] = {}
    for kind in paths:
        if kind in loaded:
            models[kind], sources[kind] = loaded[kind], f"checkpoint {paths[kind]}"
        else:
            models[kind], sources[kind] = build_model(replace(base, model=kind)), f"fresh init ({base.preset})"
        models[kind].eval()
    return base, models, sources


def decoder_text(cfg: KAEMConfig) -> str:
    d = cfg.decoder
    if d.kind == "kan":
        return (f"kan {cfg.prior.Q}->{'->'.join(map(str, d.hidden))}->{math.prod(d.image_shape)} "
                f"({d.basis}, G={d.grid_size})")
    return f"conv Q={cfg.prior.Q} channels {d.channels} -> {d.image_shape}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help=f"preset for fresh models (default fmnist; --quick: {QUICK_PRESET})")
    p.add_argument("--checkpoint-kaem", default=None, help="load the KAEM from this checkpoint")
    p.add_argument("--checkpoint-vae", default=None, help="load the VAE from this checkpoint")
    p.add_argument("--checkpoint-lebm", default=None, help="load the latent EBM from this checkpoint")
    p.add_argument("--batch", type=int, default=None, help=f"batch size besides 1 (default 64; --quick: {QUICK_BATCH})")
    p.add_argument("--seconds", type=float, default=None,
                   help=f"timed seconds per cell (default 2; --quick: {QUICK_SECONDS})")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per cell (default 4; --quick: 1)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads and onnxruntime intra-op threads")
    p.add_argument("--flush-denormal", action="store_true",
                   help="torch.set_flush_denormal(True) and onnxruntime's set_denormal_as_zero (default: off, "
                   "as in kaem-sample and the served graph)")
    p.add_argument("--ort-provider", choices=("cpu", "cuda"), default="cpu",
                   help="onnxruntime execution provider of the ORT cells (cuda: onnxruntime-gpu on a CUDA machine; "
                   "the eager cells stay on the CPU)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the numbers to this JSON file")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: {QUICK_PRESET} preset, batch {QUICK_BATCH}, {QUICK_SECONDS} s per cell")
    args = p.parse_args(argv)
    batch = args.batch if args.batch is not None else (QUICK_BATCH if args.quick else 64)
    seconds = args.seconds if args.seconds is not None else (QUICK_SECONDS if args.quick else 2.0)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 4)
    if batch < 1 or seconds <= 0 or rounds < 1 or args.threads < 1:
        p.error("--batch, --rounds and --threads must be >= 1 and --seconds > 0")
    torch.set_num_threads(args.threads)
    if args.ort_provider == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            p.error("--ort-provider cuda: this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    if args.flush_denormal and not torch.set_flush_denormal(True):
        p.error("--flush-denormal: this CPU does not support flushing denormals")
    load_before = os.getloadavg()[0]

    torch.manual_seed(0)
    cfg, models, sources = load_models(args)
    kaem, vae, lebm = models["kaem"], models["vae"], models["lebm"]
    assert isinstance(kaem, KAEM)
    decoders = {k: m.cfg.decoder for k, m in models.items()}
    same_decoder = all(d == decoders["kaem"] and m.cfg.prior.Q == kaem.cfg.prior.Q
                       for d, m in zip(decoders.values(), models.values(), strict=True))
    b = lebm.cfg.baseline
    batches = sorted({1, batch})

    print(f"preset {cfg.preset}, torch threads {torch.get_num_threads()} (onnxruntime intra-op threads "
          f"{args.threads}), denormals {'flushed' if args.flush_denormal else 'kept'}, "
          f"load average {load_before:.2f} on {os.cpu_count()} CPUs, torch {torch.__version__}")
    for kind, src in sources.items():
        print(f"  {MODEL_NAMES[kind]:10s} {src}, noise_dim {models[kind].noise_dim}")
    print(f"decoder: {decoder_text(kaem.cfg)}" + ("" if same_decoder else
          f"  WARNING: decoders differ: VAE {decoder_text(vae.cfg)}, latent EBM {decoder_text(lebm.cfg)}"))
    print(f"KAEM prior: {kaem.cfg.prior.kind}, P={kaem.cfg.prior.P} Q={kaem.cfg.prior.Q}, "
          f"{kaem.cfg.prior.basis} G={kaem.cfg.prior.grid_size}, {kaem.cfg.prior.n_quad} quadrature nodes")
    print(f"latent EBM prior: {b.prior_steps} ULA Langevin steps, step size {b.prior_step_size:g}, KAN energy "
          f"{lebm.cfg.prior.Q}->{'->'.join(map(str, b.energy_hidden))}->1 ({b.energy_basis}, G={b.energy_grid}, "
          f"{b.energy_act}, pi0 {b.energy_pi0})")
    print(f"batches {', '.join(map(str, batches))}; {seconds:g} s per cell in {rounds} round(s), "
          "median call", flush=True)

    with torch.no_grad():
        cdf = kaem.prior.cdf_table()
        lookup = BucketLookup(cdf, kaem.prior.knots)
    results: dict[str, dict[str, dict]] = {str(bs): {} for bs in batches}
    parity: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        t0 = time.perf_counter()
        export_graph(kaem, onnx_path)
        export_s = time.perf_counter() - t0
        sess = ort_session(onnx_path, args.threads, args.flush_denormal, provider=args.ort_provider)
        try:
            mean_diff, px_diff = check_parity(kaem, sess, tuple(batches))
            parity = {"max_mean_diff": mean_diff, "max_pixel_diff": px_diff}
            parity_text = f"parity vs eager: max |mean diff| {mean_diff:.2e}, max pixel diff {px_diff}"
        except ExportError as err:
            parity = {"error": str(err)}
            parity_text = f"WARNING parity check failed: {err}"
        print(f"exported KAEM to ONNX in {export_s:.1f} s ({onnx_path.stat().st_size / 1e6:.2f} MB); {parity_text}",
              flush=True)
        dec_path = Path(tmp) / "decoder.onnx"
        export_decoder(kaem, dec_path)
        dec_sess = ort_session(dec_path, args.threads, args.flush_denormal, provider=args.ort_provider)
        dec_input = dec_sess.get_inputs()[0].name
        profiles: dict[str, dict] = {}

        for bs in batches:
            u = {k: torch.from_numpy(u_for_model(m, range(bs))) for k, m in models.items()}
            u_np = np.ascontiguousarray(u["kaem"].numpy(), dtype=np.float32)
            with torch.no_grad():
                h_np = np.ascontiguousarray(kaem.latent_of_u(u["kaem"], cdf).numpy(), dtype=np.float32)

            cells = {
                "KAEM eager": no_grad_call(lambda v: kaem.generate(v, lookup=lookup), u["kaem"]),
                "KAEM prior": no_grad_call(lambda v: kaem.prior.sample(v, lookup=lookup), u["kaem"]),
                "KAEM ORT": lambda x=u_np: sess.run([OUTPUT_IMAGES], {INPUT_U: x}),
                "decoder ORT": lambda x=h_np: dec_sess.run(None, {dec_input: x}),
                "latent EBM": no_grad_call(lebm.generate, u["lebm"]),
                "VAE": no_grad_call(vae.generate, u["vae"]),
            }
            print(f"timing batch {bs} ...", file=sys.stderr, flush=True)
            for name, ts in bench(cells, seconds, rounds).items():
                results[str(bs)][name] = summarise(ts, bs)
            runs = max(10, min(300, int(seconds * 1000 / max(results[str(bs)]["KAEM ORT"]["ms_per_batch"], 1e-3))))
            profiles[str(bs)] = ort_profile(onnx_path, u_np, args.threads, args.flush_denormal, runs, args.ort_provider)
    peak = matmul_peak_gflops(args.threads)
    load_after = os.getloadavg()[0]

    print(f"\n{'model':12s} {'batch':>6s} {'ms/batch':>11s} {'images/s':>11s} {'calls':>7s}")
    for bs in batches:
        for name in CELLS:
            r = results[str(bs)][name]
            print(f"{name:12s} {bs:6d} {r['ms_per_batch']:11.3f} {r['images_per_s']:11.1f} {r['calls']:7d}")
    print("(KAEM prior = prior.sample(u, lookup) alone, part of KAEM eager; KAEM ORT = the exported graph, "
          "uint8 images output)")

    ratios: dict[str, dict[str, float]] = {}
    print("\nratios, same batch (time of one / time of the other):")
    print(f"{'batch':>6s} {'LEBM/KAEM':>10s} {'VAE/KAEM':>9s} {'eager/ORT':>10s} {'ORT/VAE':>8s} {'prior share':>12s} "
          f"{'prior share ORT':>16s}")
    flops = decoder_flops_per_image(kaem)
    for bs in batches:
        ms = {k: v["ms_per_batch"] for k, v in results[str(bs)].items()}
        ratios[str(bs)] = r = {
            "kaem_faster_than_lebm": ms["latent EBM"] / ms["KAEM eager"],
            "kaem_faster_than_vae": ms["VAE"] / ms["KAEM eager"],
            "ort_faster_than_eager": ms["KAEM eager"] / ms["KAEM ORT"],
            "ort_vs_vae": ms["KAEM ORT"] / ms["VAE"],
            "prior_share": ms["KAEM prior"] / ms["KAEM eager"],
            "prior_share_ort": profiles[str(bs)]["prior_share_ort"],
            "decoder_gflops": flops * bs / (ms["decoder ORT"] / 1000) / 1e9,
        }
        r["decoder_peak_fraction"] = r["decoder_gflops"] / peak
        print(f"{bs:6d} {r['kaem_faster_than_lebm']:9.1f}x {r['kaem_faster_than_vae']:8.2f}x "
              f"{r['ort_faster_than_eager']:9.2f}x {r['ort_vs_vae']:7.2f}x {100 * r['prior_share']:11.1f} % "
              f"{100 * r['prior_share_ort']:15.1f} %")
    print("(ORT/VAE = KAEM ORT ms / VAE eager ms; prior share ORT = onnxruntime profiler time of the nodes upstream "
          "of the decoder's first MatMul / all nodes)")
    for bs in batches:
        prof = profiles[str(bs)]
        top = ", ".join(f"{op} {100 * share:.1f} %" for op, share in list(prof["op_share"].items())[:TOP_OPS])
        print(f"onnxruntime profile, batch {bs} ({prof['runs']} runs, {prof['node_us_per_run'] / 1000:.3f} ms of "
              f"node time per run): {top}")
    if flops:
        for bs in batches:
            r = ratios[str(bs)]
            print(f"decoder roofline, batch {bs}: {flops / 1e6:.2f} MFLOP per image, decoder-only graph "
                  f"{results[str(bs)]['decoder ORT']['ms_per_batch']:.3f} ms = {r['decoder_gflops']:.1f} GFLOP/s, "
                  f"{r['decoder_peak_fraction']:.2g} of the measured peak {peak:.1f} GFLOP/s "
                  f"(best of 5 torch.matmul 2048x2048, {args.threads} threads)")
    for bs in batches:
        r = ratios[str(bs)]
        print(f"batch {bs}: KAEM eager is {r['kaem_faster_than_lebm']:.1f}x faster than the latent EBM, "
              f"{r['kaem_faster_than_vae']:.2f}x the VAE's speed; KAEM in onnxruntime is "
              f"{r['ort_faster_than_eager']:.2f}x eager; the prior takes {100 * r['prior_share']:.1f} % of KAEM "
              "generation time")
    print(f"load average {load_before:.2f} before, {load_after:.2f} after the run ({os.cpu_count()} CPUs)")

    if args.json:
        payload = {
            "preset": cfg.preset, "sources": sources, "threads": torch.get_num_threads(),
            "ort_intra_op_threads": args.threads,
            "flush_denormal": args.flush_denormal, "torch_version": str(torch.__version__),
            "load_average": [load_before, load_after], "cpus": os.cpu_count(), "quick": args.quick,
            "seconds_per_cell": seconds, "rounds": rounds, "batches": batches,
            "decoder": decoder_text(kaem.cfg), "same_decoder": same_decoder,
            "kaem_prior": {"kind": kaem.cfg.prior.kind, "P": kaem.cfg.prior.P, "Q": kaem.cfg.prior.Q},
            "lebm_prior_steps": b.prior_steps, "lebm_prior_step_size": b.prior_step_size,
            "noise_dim": {k: m.noise_dim for k, m in models.items()},
            "onnx_export_s": export_s, "onnx_parity": parity, "results": results, "ratios": ratios,
            "ort_profile": profiles, "matmul_peak_gflops": peak, "decoder_flops_per_image": flops,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
