"""``python -m bench.reproduction``: the command (see the package's docstring)."""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import bench.reproduction as package
from bench.reproduction import world as worlds
from bench.reproduction.experiment import DEFAULT_METHODS, METHODS, REPO, SCALES, Pipeline, run_world, say
from bench.reproduction.report import write_report

sys.path.insert(0, os.path.join(REPO, "examples"))
from quickstart import prepare_workdir  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=package.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=os.path.join(REPO, "runs", "reproduction"))
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the harness end to end, small, two worlds, one seed")
    size.add_argument("--gpu", action="store_true", help="a larger model and budget, 5 seeds; CUDA")
    p.add_argument("--worlds", type=int, default=None,
                   help="worlds 0..K-1 of bench.reproduction.world (default 6; --quick 2)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated subset of: {','.join(METHODS)} (default: {','.join(DEFAULT_METHODS)})")
    p.add_argument("--seeds", type=int, default=None, help="seeds per setting (default 4; --gpu 5; --quick 1)")
    p.add_argument("--lrs", default=None, help="the learning-rate grid, comma-separated")
    p.add_argument("--steps", type=int, default=None, help="preference steps per run")
    p.add_argument("--warmup-steps", type=int, default=None, help="supervised warm-up steps")
    p.add_argument("--no-study", action="store_true", help="skip the batch-size study")
    p.add_argument("--jobs", type=int, default=None, help="training runs at a time (default: 2 on CPU, 1 on CUDA)")
    args = p.parse_args()
    scale = SCALES["quick" if args.quick else "gpu" if args.gpu else "default"]
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA; this machine has none")
    if args.methods:
        unknown = [m for m in args.methods.split(",") if m.strip() not in METHODS]
        if unknown:
            raise SystemExit(f"--methods: unknown {unknown}; the methods are {list(METHODS)}")
        scale.methods = tuple(m.strip() for m in args.methods.split(","))
    try:
        lrs = args.lrs and tuple(float(x) for x in args.lrs.split(","))
    except ValueError:
        raise SystemExit(f"--lrs takes comma-separated numbers, e.g. 1e-4,3e-4; got {args.lrs!r}") from None
    for name, value in (("seeds", args.seeds and tuple(range(args.seeds))), ("lrs", lrs),
                        ("worlds", args.worlds and tuple(range(args.worlds))),
                        ("steps", args.steps), ("warmup_steps", args.warmup_steps), ("jobs", args.jobs)):
        if value:
            setattr(scale, name, value)
    if args.no_study:
        scale.study = ()
    if torch.cuda.is_available() and any(nproc > torch.cuda.device_count() for _, nproc, _ in scale.study):
        # NCCL cannot put two ranks on one GPU.
        print(f"this machine has {torch.cuda.device_count()} GPU(s): the study's runs on more ranks are skipped")
        scale.study = tuple(c for c in scale.study if c[1] <= torch.cuda.device_count())
    torch.set_num_threads(1)  # the evaluations share the cores with the training processes
    started = time.time()
    work = os.path.abspath(args.workdir)
    prepare_workdir(work, marker=".megatron_rpo_reproduction", made_by="python -m bench.reproduction")
    results: dict[str, dict] = {}
    per_world: dict[int, dict] = {}
    runs_total = len(scale.worlds) * len(scale.methods) * len(scale.lrs) * len(scale.seeds)
    say(f"{len(scale.worlds)} world(s) x {len(scale.methods)} methods x {len(scale.lrs)} learning rates x "
        f"{len(scale.seeds)} seeds = {runs_total} preference runs of {scale.steps} steps of {scale.pairs_per_step} "
        f"pairs, and the batch-size study in world {scale.worlds[0]}")
    for k, seed in enumerate(scale.worlds):
        world = worlds.draw(seed)
        per_world[seed] = run_world(Pipeline(os.path.join(work, f"world{seed}"), scale), scale, world, results,
                                    study=bool(scale.study) and k == 0)
        done = sum(1 for r in results.values() if r["nproc"] == 1 and r["micro"] == scale.pairs_per_step)
        elapsed = time.time() - started
        print(f"world {seed} done: {done}/{runs_total} runs in {elapsed / 60:.1f} min "
              f"(about {elapsed / max(done, 1) * (runs_total - done) / 60:.0f} min to go)", flush=True)

    say(f"results ({(time.time() - started) / 60:.1f} min)")
    report = write_report(work, scale, per_world, results, minutes=(time.time() - started) / 60)
    print(report)
    print(f"written: {os.path.join(work, 'results.md')}, {os.path.join(work, 'reproduction.png')}, "
          f"{os.path.join(work, 'results.json')}")



if __name__ == "__main__":
    main()
