"""Sample quality against model evaluations (NFE) for the in-house samplers and diffusers' schedulers, on the demo.

    python train.py --results-dir runs                                  # the CPU demo model (~5 min), if not trained
    OMP_NUM_THREADS=2 python -m benchmarks.sampler_nfe runs/000-FCDM-T/checkpoints/0002000.pt
    python -m benchmarks.sampler_nfe CKPT --precision                   # instead: how far bf16 moves the samples

Every sampler starts from the same initial noise (sample i from seed + i, labels i mod 10, CFG 3.0 as the demo's own
evaluation), so the rows differ by the sampler alone. Each row: fcdm.eval.demo_quality's class accuracy and Frechet
distance of the small shape classifier's features to held-out real images, with the sampling noise of both at this
sample count (accuracy: binomial standard error; FD: bootstrap standard deviation over the generated samples).
Writes a markdown table to stdout, the rows as JSON and a plot (matplotlib PNG). About 15 minutes on 2 shared CPU
cores with the default 150 samples per point; --precision about 10.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import REPO_ROOT, environment
from fcdm.eval.demo_quality import DemoQuality, frechet_distance
from fcdm.pipeline import FCDMPipeline
from fcdm.sampling import generate, seeded_batch

# key -> (label, in-house sampler or None, diffusers scheduler or None, NFEs). At 250 steps the deterministic solvers
# all approach the same probability-flow ODE, whose in-house DDIM-250 row stands for them (and keeps the run short).
RUNS = {
    "ddpm": ("DDPM (in-house)", "ddpm", None, (10, 20, 50, 250)),
    "ddim": ("DDIM (in-house)", "ddim", None, (10, 20, 50, 250)),
    "dpmsolver++": ("DPM-Solver++ 2M", None, "dpmsolver++", (10, 20, 50)),
    "unipc": ("UniPC", None, "unipc", (10, 20, 50)),
    "euler": ("Euler", None, "euler", (10, 20, 50)),
    "dpmsolver++-sde": ("SDE-DPM-Solver++ 2M", None, "dpmsolver++-sde", (10, 20, 50)),
    "euler-ancestral": ("Euler ancestral", None, "euler-ancestral", (10, 20, 50)),
    "diffusers-ddpm": ("DDPM (diffusers)", None, "ddpm", (10, 20, 50)),
}


def sample(pipe, n: int, seed: int, cfg: float, sampler=None, scheduler=None, steps=250, autocast=None):
    """n class-balanced samples in [-1, 1] (pixel space), sample i from seed + i."""
    y, noise, gens = seeded_batch(range(n), seed, pipe.num_classes, pipe.decoder()[1], pipe.device)
    stats = {}
    x = generate(pipe.model, pipe.objective, y, noise.shape[1:], sampler=sampler, scheduler=scheduler, steps=steps,
                 cfg_scale=cfg, noise=noise, generator=gens, autocast_dtype=autocast, stats=stats)
    return x.clamp(-1, 1), y, stats["nfe"]


def score(judge: DemoQuality, x, y, bootstrap: int, rng: np.random.Generator) -> dict:
    feats, logits = judge.classify(x)
    acc = float((logits.argmax(1) == y.cpu().numpy()).mean())
    fds = [frechet_distance(feats[rng.integers(0, len(feats), len(feats))], judge.real_features)
           for _ in range(bootstrap)]
    return {"class_accuracy": acc, "accuracy_se": float(np.sqrt(acc * (1 - acc) / len(y))),
            "fd": frechet_distance(feats, judge.real_features), "fd_bootstrap_sd": float(np.std(fds))}


def nfe_table(pipe, judge, args) -> list[dict]:
    rows, rng = [], np.random.default_rng(0)
    for key in args.samplers:
        label, sampler, scheduler, nfes = RUNS[key]
        for steps in nfes:
            if args.max_nfe and steps > args.max_nfe:
                continue
            start = time.perf_counter()
            x, y, nfe = sample(pipe, args.num_samples, args.seed, args.cfg_scale, sampler, scheduler, steps)
            row = {"sampler": label, "nfe": nfe, **score(judge, x, y, args.bootstrap, rng),
                   "seconds": round(time.perf_counter() - start, 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def precision_check(pipe, judge, args) -> list[dict]:
    """fp32 against bf16 autocast (the network only; sampler maths stays fp32), same noise, same generators."""
    rows, rng = [], np.random.default_rng(1)
    for sampler, scheduler, steps in (("ddpm", None, 250), (None, "dpmsolver++", 20)):
        x32, y, _ = sample(pipe, args.precision_samples, args.seed, args.cfg_scale, sampler, scheduler, steps)
        x16, _, _ = sample(pipe, args.precision_samples, args.seed, args.cfg_scale, sampler, scheduler, steps,
                           autocast=torch.bfloat16)
        per_sample = ((x16 - x32).flatten(1).norm(dim=1) / x32.flatten(1).norm(dim=1)).numpy()
        s32, s16 = score(judge, x32, y, args.bootstrap, rng), score(judge, x16, y, args.bootstrap, rng)
        row = {"sampler": scheduler or sampler, "nfe": steps, "samples": len(y),
               "rel_l2_batch": float((x16 - x32).norm() / x32.norm()), "rel_l2_median": float(np.median(per_sample)),
               "rel_l2_max": float(per_sample.max()),
               "pixels_changed_over_1_of_255": float(((x16 - x32).abs() * 127.5 > 1).float().mean()),
               "fp32": s32, "bf16": s16}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def plot(rows: list[dict], path, num_samples: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_acc, ax_fd) = plt.subplots(1, 2, figsize=(11, 4))
    for label in dict.fromkeys(r["sampler"] for r in rows):
        mine = [r for r in rows if r["sampler"] == label]
        nfe = [r["nfe"] for r in mine]
        ax_acc.errorbar(nfe, [r["class_accuracy"] for r in mine], [r["accuracy_se"] for r in mine], marker="o",
                        capsize=3, label=label)
        ax_fd.errorbar(nfe, [r["fd"] for r in mine], [r["fd_bootstrap_sd"] for r in mine], marker="o", capsize=3,
                       label=label)
    for ax, name in ((ax_acc, "class accuracy (higher is better)"), (ax_fd, "Frechet distance (lower is better)")):
        ax.set_xscale("log")
        ax.set_xticks([10, 20, 50, 250], ["10", "20", "50", "250"])
        ax.set_xlabel("model evaluations (NFE)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)
    fig.suptitle(f"FCDM-T demo (procedural shapes, 16 px), CFG 3, {num_samples} samples per point; bars: 1 s.e.")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(rows: list[dict]) -> str:
    lines = ["| sampler | NFE | class accuracy | Frechet distance |", "|---|---:|---:|---:|"]
    lines += [f"| {r['sampler']} | {r['nfe']} | {r['class_accuracy']:.3f} ± {r['accuracy_se']:.3f} | "
              f"{r['fd']:.1f} ± {r['fd_bootstrap_sd']:.1f} |" for r in rows]
    return "\n".join(lines)


def checkpoint_name(path: str) -> str:
    """The checkpoint as the results record it: relative to the repository when inside it, else its file name (a
    machine's own directories do not belong in committed results)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO_ROOT)) if resolved.is_relative_to(REPO_ROOT) else resolved.name


def previous_rows(args, result: dict) -> list[dict]:
    """With --append: the rows of <out>.json, whose settings must equal this run's."""
    if not args.append:
        return []
    with open(args.out + ".json") as f:
        before = json.load(f)
    same = ("ckpt", "num_samples", "cfg_scale", "fd_real")
    if any(before[k] != result[k] for k in same):
        raise SystemExit(f"--append: {args.out}.json was made with other settings ({', '.join(same)})")
    return before["rows"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ckpt", help="a demo checkpoint (python train.py): pixel space, 10 classes, DDPM objective")
    p.add_argument("--num-samples", type=int, default=150, help="samples per point (class-balanced)")
    p.add_argument("--cfg-scale", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the FD's spread")
    p.add_argument("--max-nfe", type=int, default=None, help="skip rows above this NFE (a quick look)")
    p.add_argument("--samplers", nargs="+", choices=list(RUNS), default=list(RUNS), help="rows to run")
    p.add_argument("--append", action="store_true", help="add the rows to those of <out>.json (same settings)")
    p.add_argument("--precision", action="store_true", help="measure bf16 against fp32 instead of the NFE table")
    p.add_argument("--precision-samples", type=int, default=100)
    p.add_argument("--classifier-steps", type=int, default=500, help="the judge's training steps (cached)")
    p.add_argument("--out", default=str(REPO_ROOT / "docs" / "img" / "sampler_nfe"), help="path stem of .json/.png")
    args = p.parse_args(argv)
    pipe = FCDMPipeline.from_pretrained(args.ckpt, device="cpu")
    if pipe.spec["autoencoder"]["name"] is not None or pipe.num_classes != 10:
        raise SystemExit("expected a demo checkpoint: pixel space (no VAE), 10 classes")
    judge = DemoQuality(pipe.spec["image_size"], pipe.objective, "ddpm", 1, args.cfg_scale, log=lambda *a: None,
                        classifier_steps=args.classifier_steps,
                        num_samples=args.precision_samples if args.precision else args.num_samples)
    result = {"environment": environment(torch.device("cpu")), "ckpt": checkpoint_name(args.ckpt),
              "num_samples": args.num_samples,
              "cfg_scale": args.cfg_scale, "fd_real": judge.fd_real, "real_accuracy": judge.real_accuracy}
    if args.precision:
        result["precision"] = precision_check(pipe, judge, args)
        with open(args.out + "_precision.json", "w") as f:
            json.dump(result, f, indent=1)
        return
    result["rows"] = previous_rows(args, result) + nfe_table(pipe, judge, args)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    plot(result["rows"], args.out + ".png", args.num_samples)
    print(markdown(result["rows"]))
    print(f"fd_real (two real sets of {args.num_samples}): {judge.fd_real:.2f}; wrote {args.out}.json and .png")


if __name__ == "__main__":
    main()
