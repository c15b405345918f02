"""Does the suite catch the bugs we would really make? Plant each one in a copy of the repository and see.

    python -m tests.mutation_check                 # every mutation (minutes on 2 CPU cores)
    python -m tests.mutation_check --baseline      # first check that the selected tests pass unmutated
    python -m tests.mutation_check --only ema-before-optimizer-step --only timestep-sin-cos
    python -m tests.mutation_check --list

Each mutation is a one-line (or one-statement) change of the source: the text to find, which must occur exactly
once (tests/test_mutation_list.py checks that, so the list cannot rot silently), and its replacement. The repository's
files (tracked and untracked, not ignored) are copied to a temporary directory once; for each mutation the file is
changed there, the tests that should catch it run (a targeted selection, not the whole suite), and the file is put
back. A mutation is caught when a selected test fails; the table names the failing tests and the first failure's
message. Exit status 1 if any mutation survives (or its selection errors out instead of failing). CI does not run
this; run it after changing the tests or the code they guard.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str              # relative to the repository root
    find: str              # must occur exactly once in `path`
    replace: str
    tests: tuple[str, ...]  # pytest node ids (files, tests, parametrized cases)
    why: str               # the bug, in words
    env: dict = field(default_factory=dict)


EDGE = "tests/test_kernel_edge_cases.py"
MUTATIONS = [
    # --- the five bugs an audit found the suite blind to -------------------------------------------------------------
    Mutation("triton-interpreter-not-forced", "tests/conftest.py",
             'os.environ["TRITON_INTERPRET"] = "1"', 'os.environ.setdefault("TRITON_INTERPRET", "1")',
             ("tests/test_triton_dwconv_ln_modulate.py::test_matches_fp64_reference",
              "tests/test_triton_grn_mlp.py::test_matches_fp64_reference",
              "tests/test_triton_block.py::test_tiny_fcdm_training_matches_torch_backend"),
             "a shell's TRITON_INTERPRET=0 wins, so the Triton tests would run the torch fallback",
             env={"TRITON_INTERPRET": "0"}),
    Mutation("ln-eps-outside-sqrt", "fcdm_kernels/triton/dwconv_ln_modulate.py",
             "rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / C + eps)",
             "rstd = 1.0 / (tl.sqrt(tl.sum(diff * diff, axis=1) / C) + eps)",
             (f"{EDGE}::test_triton_dwconv_ln_modulate_edge_case[small_variance]",
              f"{EDGE}::test_triton_block_op_edge_case[small_variance]"),
             "LayerNorm 1/(sqrt(var)+eps) instead of 1/sqrt(var+eps) in the Triton dwconv kernel"),
    Mutation("grn-eps-dropped", "fcdm_kernels/triton/grn_mlp.py",
             "inv_m = 1.0 / (tl.sum(total, axis=0) / J + eps)", "inv_m = 1.0 / (tl.sum(total, axis=0) / J)",
             (f"{EDGE}::test_triton_grn_mlp_edge_case[zero_hidden_sample]",
              f"{EDGE}::test_triton_block_op_edge_case[zero_hidden_sample]"),
             "GRN's eps dropped from the channel mean in _grn_scale_kernel"),
    Mutation("ema-before-optimizer-step", "fcdm/train/loop.py",
             "        run.opt.step()\n        run.ema.update(run.model, state.step)",
             "        run.ema.update(run.model, state.step)\n        run.opt.step()",
             ("tests/test_train_semantics.py",),
             "the EMA updated before the optimiser step (one step stale)"),
    Mutation("timestep-sin-cos", "fcdm/models/embeddings.py",
             "emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)",
             "emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)",
             ("tests/test_official_golden.py",),
             "timestep embedding laid out [sin | cos] instead of the official [cos | sin]"),
    # --- more of the same kind ---------------------------------------------------------------------------------------
    Mutation("block-op-not-used", "fcdm_kernels/dispatch.py",
             "fused = implementation_on(\"convnext_block\", mlp_backend) if conv_backend == mlp_backend else None",
             "fused = implementation_on(\"convnext_block\", mlp_backend) if conv_backend != mlp_backend else None",
             ("tests/test_triton_block.py::test_block_op_matches_fp64_reference",
              "tests/test_dispatch.py::test_a_registered_whole_block_op_runs_the_block"),
             "the Triton whole-block op silently replaced by the two ops (right numbers, wrong implementation)"),
    Mutation("gelu-tanh-form", "fcdm_kernels/triton/grn_mlp.py",
             "return 0.5 * pre * (1.0 + tl.math.erf(pre * SQRT1_2))",
             "return pre * tl.sigmoid(1.5957691216057308 * (pre + 0.044715 * pre * pre * pre))",
             ("tests/test_triton_grn_mlp.py::test_matches_fp64_reference",),
             "the tanh approximation of GELU in the Triton kernels instead of the exact erf form"),
    Mutation("dwconv-halo-off-by-one", "fcdm_kernels/triton/dwconv_ln_modulate.py",
             " row_ok = mask_p & (iy >= 0) & (iy < H)", " row_ok = mask_p & (iy > 0) & (iy < H)",  # forward tap
             ("tests/test_triton_dwconv_ln_modulate.py::test_matches_fp64_reference",),
             "the Triton 7x7 stencil drops the image's first row from every tap (halo off by one)"),
    Mutation("cuda-halo-off-by-one", "csrc/dwconv_ln_modulate.cu",
             "const bool inside = y >= 0 && y < H && xx >= 0 && xx < W && c < C;",
             "const bool inside = y > 0 && y < H && xx >= 0 && xx < W && c < C;",
             (f"{EDGE}::test_emulated_cuda_dwconv_ln_modulate_edge_case",),
             "the CUDA halo tile treats the image's first row as padding (run in the CPU emulation)"),
    Mutation("cuda-ln-eps-outside-sqrt", "csrc/dwconv_ln_modulate.cu",
             "s.rstd[p] = 1.f / sqrtf(var + eps);", "s.rstd[p] = 1.f / (sqrtf(var) + eps);",
             (f"{EDGE}::test_emulated_cuda_dwconv_ln_modulate_edge_case",),
             "LayerNorm eps outside the square root in the CUDA kernel (run in the CPU emulation)"),
    Mutation("residual-dropped", "fcdm_kernels/reference.py",
             "return (x + z * gate[:, None, None, :]).to(out_dtype)", "return (z * gate[:, None, None, :]).to(out_dtype)",
             ("tests/test_official_golden.py",),
             "the block's residual dropped from the reference (and so from the torch backend)"),
    Mutation("grn-self-normalised", "fcdm_kernels/reference.py",
             "n = g / (g.mean(dim=-1, keepdim=True) + eps)", "n = g / (g.mean(dim=(1, 2), keepdim=True) + eps)",
             ("tests/test_official_golden.py",),
             "GRN divides each channel's norm by itself instead of the mean over channels"),
    Mutation("shift-scale-swapped", "fcdm/models/fcdm.py",
             "shift, scale, gate = (m.to(dt).contiguous() for m in self.adaLN_modulation(c).chunk(3, dim=1))",
             "scale, shift, gate = (m.to(dt).contiguous() for m in self.adaLN_modulation(c).chunk(3, dim=1))",
             ("tests/test_official_golden.py",),
             "adaLN shift and scale chunks swapped in the block (official checkpoints would load and be wrong)"),
    Mutation("final-layer-modulation", "fcdm/models/fcdm.py",
             "x = x * (1 + scale[:, None, None, :]) + shift[:, None, None, :]",
             "x = x * scale[:, None, None, :] + shift[:, None, None, :]",
             ("tests/test_official_golden.py::test_final_layer_matches_official",),
             "the final layer scales by `scale` instead of `1 + scale`"),
    Mutation("null-class-wrong", "fcdm/models/embeddings.py",
             "return torch.where(drop, torch.full_like(labels, self.num_classes), labels)",
             "return torch.where(drop, torch.full_like(labels, self.num_classes - 1), labels)",
             ("tests/test_official_golden.py::test_label_embedder_and_its_null_class_match_official",),
             "a dropped label becomes the last real class instead of the null class"),
    Mutation("trainer-null-class-wrong", "fcdm/train/loop.py",
             "y = torch.where(drop < args.class_dropout_prob, torch.full_like(y, args.num_classes), y)",
             "y = torch.where(drop < args.class_dropout_prob, torch.full_like(y, args.num_classes - 1), y)",
             ("tests/test_train_semantics.py::test_label_dropout_gives_the_null_class_at_about_the_requested_rate",),
             "the trainer's CFG dropout uses the last real class as the null label"),
    Mutation("ema-weight-inverted", "fcdm/train/ema.py",
             "lerp_average_(self.module, model, 1.0 - self.decay_at(step))",
             "lerp_average_(self.module, model, self.decay_at(step))",
             ("tests/test_train_semantics.py::test_ema_with_decay_d_is_d_old_plus_1_minus_d_new",),
             "the EMA moves by decay instead of 1 - decay towards the model"),
    Mutation("lr-warmup-off-by-one", "fcdm/train/loop.py",
             "return args.lr * min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else args.lr",
             "return args.lr * min(1.0, step / args.warmup_steps) if args.warmup_steps else args.lr",
             ("tests/test_train_semantics.py::test_logged_lr_follows_the_warmup",),
             "the warmup starts at lr 0 (step 0 does nothing)"),
    Mutation("same-order-every-epoch", "fcdm/data/sampler.py",
             "g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)",
             "g = torch.Generator().manual_seed(self.seed * 1_000_003)",
             ("tests/test_train_semantics.py::test_every_epoch_visits_each_item_once_in_a_new_order",),
             "the data order is not reshuffled between epochs"),
    Mutation("power-ema-beta-exponent", "fcdm/ema.py",
             "return (1.0 - 1.0 / step) ** (gamma + 1.0)", "return (1.0 - 1.0 / step) ** gamma",
             ("tests/test_posthoc_ema.py::test_power_ema_tracks_the_direct_weighted_sum",),
             "the power-function EMA decays with exponent gamma instead of gamma + 1 (the wrong profile)"),
    Mutation("posthoc-coefficients-unnormalised", "fcdm/ema.py",
             "    return x / x.sum()", "    return x * 1.0  # unnormalised",
             ("tests/test_posthoc_ema.py::test_reconstruction_matches_a_direct_ema_with_that_profile",),
             "the least-squares coefficients are not scaled to sum to one"),
    Mutation("milestones-pruned", "fcdm/train/resume.py",
             "return keep_every > 0 and step % keep_every == 0", "return False",
             ("tests/test_train_recipe.py::test_keep_every_keeps_milestones_and_keep_last_counts_the_others",),
             "--keep-every milestones are deleted like any other checkpoint"),
    Mutation("slurm-rank-ignored", "fcdm/distributed.py",
             'return int(environ["SLURM_PROCID"]), int(tasks), int(environ.get("SLURM_LOCALID", 0)), "slurm"',
             'return 0, 1, 0, "single"  # SLURM ignored',
             ("tests/test_slurm.py::test_placement_prefers_torchrun_then_slurm_then_a_single_process",),
             "srun's tasks each start as a single rank-0 process"),
]


def by_name(names) -> list[Mutation]:
    known = {m.name: m for m in MUTATIONS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown mutation(s) {unknown}; --list shows them")
    return [known[n] for n in names]


def copy_repository(dest: Path) -> None:
    """Tracked and untracked-but-not-ignored files: what a clean clone plus the work in progress holds."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def run_pytest(root: Path, tests, env_extra: dict, timeout: int) -> tuple[int, str, float]:
    # COLUMNS: pytest cuts the -rf summary lines (and with them the failure messages) to the terminal width.
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "1000", **env_extra}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--maxfail", "3", "-rf", "--tb=line",
           *tests]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        return done.returncode, done.stdout + done.stderr, time.perf_counter() - start
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return -999, out + f"\ntimed out after {timeout} s", time.perf_counter() - start


def failures(output: str) -> list[tuple[str, str]]:
    """(test name, first line of its message) from pytest's -rf summary."""
    found = []
    for line in output.splitlines():
        m = re.match(r"FAILED (\S+?)(?: - (.*))?$", line.strip())
        if m:
            found.append((m.group(1).rsplit("/", 1)[-1], (m.group(2) or "").strip()))
    return found


def verdict(rc: int, output: str) -> str:
    if rc == 0:
        return "MISSED"
    if rc == 1 and failures(output):
        return "caught"
    if rc < 0 and rc != -999:
        return "caught (crash)"   # killed by a signal: a kernel bug that segfaults is caught, loudly
    return "ERROR"                # collection or usage error, timeout, nothing collected: fix the mutation


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Plant realistic one-line bugs in a copy of the repository and check "
                                            "that the tests catch each one.")
    p.add_argument("--only", action="append", default=[], metavar="NAME", help="run only these mutations")
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    p.add_argument("--baseline", action="store_true", help="first run every selected test unmutated (must pass)")
    p.add_argument("--timeout", type=int, default=600, help="seconds per pytest run")
    p.add_argument("--keep", action="store_true", help="keep the temporary copy")
    args = p.parse_args(argv)
    mutations = by_name(args.only) if args.only else MUTATIONS
    if args.list:
        for m in mutations:
            print(f"{m.name:32} {m.path:44} {m.why}")
        return 0

    root = Path(tempfile.mkdtemp(prefix="fcdm-mutants-"))
    try:
        copy_repository(root)
        print(f"copy of {REPO} in {root}; {len(mutations)} mutations", flush=True)
        if args.baseline:
            tests = sorted({t for m in mutations for t in m.tests})
            rc, out, seconds = run_pytest(root, tests, {}, args.timeout * 2)
            print(f"baseline: {len(tests)} selections, exit {rc} in {seconds:.0f} s", flush=True)
            if rc != 0:
                print(out[-6000:])
                return 2
        rows = []
        for m in mutations:
            target = root / m.path
            original = target.read_text()
            if original.count(m.find) != 1:
                rows.append((m, "ERROR", 0.0, [("-", f"search text found {original.count(m.find)} times")]))
                continue
            target.write_text(original.replace(m.find, m.replace))
            try:
                rc, out, seconds = run_pytest(root, m.tests, m.env, args.timeout)
            finally:
                target.write_text(original)
            result = verdict(rc, out)
            detail = failures(out) or [("-", out.strip().splitlines()[-1] if out.strip() else f"exit {rc}")]
            rows.append((m, result, seconds, detail))
            first = detail[0]
            print(f"{result:14} {m.name:32} {seconds:5.0f} s  {first[0]}: {first[1][:150]}", flush=True)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    caught = [r for r in rows if r[1].startswith("caught")]
    print("\n| mutation | file | result | s | failing tests (first message) |\n|---|---|---|---|---|")
    for m, result, seconds, detail in rows:
        names = ", ".join(name for name, _ in detail[:3])
        message = detail[0][1][:120].replace("|", "/")
        print(f"| {m.name} | `{m.path}` | {result} | {seconds:.0f} | {names}: {message} |")
    total = sum(r[2] for r in rows)
    print(f"\n{len(caught)} of {len(rows)} mutations caught ({total:.0f} s of pytest)")
    return 0 if len(caught) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
