"""The experiment: the methods, the scales, the real pipeline's commands, and one world's runs."""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import torch

from bench.reproduction import world as worlds
from bench.reproduction.evaluation import Evaluator

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# key -> (what the tables call it, loss overrides, trained on the unpaired items)
METHODS = {
    "dpo": ("DPO", ["loss.loss_type=dpo"], False),
    "rpo_embedding": ("RPO paired, embedding weights", ["loss.loss_type=rpo", "loss.weighting=embedding",
                                                         "loss.tau=0.5"], False),
    "rpo_embedding_mean": ("RPO paired, embedding weights, rows mean 1",
                           ["loss.loss_type=rpo", "loss.weighting=embedding", "loss.tau=0.5",
                            "loss.row_normalization=mean"], False),
    "rpo_uniform": ("RPO paired, uniform weights", ["loss.loss_type=rpo", "loss.weighting=uniform"], False),
    "rpo_diagonal": ("RPO paired, diagonal weights", ["loss.loss_type=rpo", "loss.weighting=diagonal",
                                                       "loss.alpha=0.8"], False),
    "rpo_unpaired": ("RPO unpaired", ["loss.loss_type=rpo", "loss.weighting=embedding", "loss.tau=0.75"], True),
    "kto": ("KTO", ["loss.loss_type=kto"], True),
    "ipo": ("IPO", ["loss.loss_type=ipo"], False),
    "simpo": ("SimPO", ["loss.loss_type=simpo", "loss.beta=2.0", "loss.gamma=0.5"], False),
    "simpo_rpo": ("SimPO+RPO", ["loss.loss_type=simpo_rpo", "loss.beta=2.0", "loss.gamma=0.5", "loss.tau=0.5"],
                  False),
}
DEFAULT_METHODS = ("dpo", "rpo_embedding", "rpo_embedding_mean", "rpo_uniform", "rpo_unpaired", "kto", "ipo", "simpo")
# Pairs of methods that differ in one thing, compared run by run in the report: (first, second, what differs).
COMPARISONS = (("rpo_embedding_mean", "rpo_embedding", "the row normalisation"),
               ("rpo_embedding", "rpo_uniform", "the contrast weights"),
               ("kto", "rpo_unpaired", "the loss on unpaired items"))
COLLAPSED_BELOW = 0.5  # a run whose greedy test replies keep the world's shape less often than this has collapsed
# The batch-size study's method: rows averaging 1 keep each cell's beta as the matrix grows (with rows
# summing to 1 a larger matrix also shrinks the effective beta; docs/loss.md), so only the matrix changes.
STUDY_METHOD = "rpo_embedding_mean"


@dataclass
class Scale:
    """How big the world, the model and the budget are."""

    worlds: tuple = (0, 1, 2, 3, 4, 5)  # bench.reproduction.world's seeds (0: the hand-built world)
    held_out_per_topic: int = 12      # validation prompts per topic, and as many test prompts
    pairs_per_prompt: int = 2         # preference pairs per training prompt
    demos_per_prompt: int = 4         # warm-up replies per training prompt
    model: dict = field(default_factory=lambda: dict(num_layers=2, hidden_size=128, ffn_hidden_size=352,
                                                     num_attention_heads=4, num_query_groups=2))
    vocab_size: int = 1000
    warmup_steps: int = 400
    warmup_lr: float = 1e-3
    steps: int = 100                  # preference steps, 8 pairs (16 unpaired items) each
    pairs_per_step: int = 8
    lrs: tuple = (1e-4, 2e-4, 3e-4, 5e-4)
    seeds: tuple = (0, 1, 2, 3)
    methods: tuple = DEFAULT_METHODS
    # The batch-size study's extra runs of STUDY_METHOD at its chosen learning rate, each
    # (pairs per rank and microbatch, ranks, contrast scope); the main runs are 1 rank x pairs_per_step.
    study: tuple = ((2, 1, "data_parallel"), (4, 1, "data_parallel"), (4, 2, "data_parallel"), (4, 2, "local"))
    jobs: int = 2                     # training runs at a time (one CPU process each)


SCALES = {
    "default": Scale(),
    # Every stage once, small, in two worlds: the functional test's. Its one study run (2 ranks x 4
    # pairs, the matrix gathered) must end where the main RPO run (1 rank x 8 pairs) does.
    "quick": Scale(worlds=(0, 1), held_out_per_topic=2, pairs_per_prompt=1, demos_per_prompt=1, warmup_steps=30,
                   steps=4, lrs=(3e-4,), seeds=(0,), methods=("dpo", "rpo_embedding_mean", "rpo_unpaired", "kto"),
                   study=((4, 2, "data_parallel"),)),
    "gpu": Scale(model=dict(num_layers=4, hidden_size=256, ffn_hidden_size=688, num_attention_heads=8,
                            num_query_groups=4),
                 warmup_steps=800, steps=200, seeds=(0, 1, 2, 3, 4), jobs=1),
}


def say(message: str) -> None:
    print(f"\n== {message}", flush=True)


class Pipeline:
    """The run folder and the commands of the real pipeline."""

    def __init__(self, work: str, scale: Scale):
        self.work, self.scale = work, scale
        self.recipe = os.path.join(work, "recipe.yaml")

    def write_recipe(self) -> None:
        import yaml

        s = self.scale
        recipe = {
            "model": dict(s.model, vocab_size=s.vocab_size, make_vocab_size_divisible_by=8,
                          max_position_embeddings=128, norm_epsilon=1e-6),
            "data": {"max_prompt_length": 48, "max_length": 80},
            "loss": {"reference": "online"},
            "optimizer": {"optimizer": "adam", "clip_grad": 1.0},
            "train": {"log_interval": 10, "global_batch_size": s.pairs_per_step, "micro_batch_size": s.pairs_per_step},
        }
        with open(self.recipe, "w") as f:
            yaml.safe_dump(recipe, f, sort_keys=False)

    def train(self, run_dir: str, nproc: int, overrides: list[str]) -> float:
        """``torchrun -m megatron_rpo.train``; its output goes to ``run_dir/train.log``. Returns seconds."""
        os.makedirs(run_dir, exist_ok=True)
        log = os.path.join(run_dir, "train.log")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "megatron_rpo.train", "--config", self.recipe, f"train.save={run_dir}",
               "train.save_interval=1000000", "train.keep_last=1", *overrides]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        started = time.time()
        with open(log, "w") as f:
            done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        if done.returncode != 0:
            with open(log) as f:
                tail = "".join(f.readlines()[-30:])
            raise RuntimeError(f"training failed (exit {done.returncode}): {' '.join(cmd)}\n"
                               f"last lines of {log}:\n{tail}")
        return time.time() - started

    def export(self, run_dir: str) -> str:
        from megatron_rpo.convert import convert_megatron_to_hf

        hf = os.path.join(run_dir, "hf")
        convert_megatron_to_hf(os.path.join(run_dir, "export"), hf, progress=False)
        return hf




@dataclass
class Run:
    world: int
    method: str
    lr: float
    seed: int
    micro: int           # pairs (or items, unpaired) per rank and microbatch: the matrix's side per rank
    nproc: int = 1
    scope: str = "data_parallel"

    @property
    def name(self) -> str:
        return f"w{self.world}_{self.method}_lr{self.lr:g}_s{self.seed}_m{self.micro}_dp{self.nproc}_{self.scope}"


def prepare(pipe: Pipeline, scale: Scale, world) -> dict:
    """The world's files (checked), tokenizer, converted model and datasets; returns their paths and checks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_rpo.config import load_config
    from megatron_rpo.convert import convert_hf_to_megatron
    from megatron_rpo.convert.hf_config import hf_config_from_model
    from megatron_rpo.data.embeddings import precompute_prompt_embeddings
    from megatron_rpo.data.preprocess import preprocess
    from megatron_rpo.data.tokenizer import train_sentencepiece

    work = pipe.work
    say(f"{world.describe()}: prompts, base replies, judged preferences (a new draw per seed)")
    checks = world.check(scale.held_out_per_topic, split_seed=2024)
    print(f"checks: base policy wrong in {checks['base_wrong_groups']} of {checks['groups']} groups; labels agree "
          f"with the judge {checks['label_agreement']:.3f} of the time (the temperature states "
          f"{checks['label_agreement_stated']:.3f}); desirable items {checks['unpaired_reward_gap']:+.2f} reward over "
          f"undesirable ones; {checks['held_out_overlap']} held-out prompts seen in training")
    failures = worlds.check_failures(checks)
    if failures:
        raise SystemExit(f"world {world.seed} is not usable: {'; '.join(failures)}")
    train_prompts, valid, test = world.split_prompts(world.make_prompts(), scale.held_out_per_topic, seed=2024)
    rng = random.Random(2024)
    files = {"demonstrations": world.make_demonstrations(train_prompts, scale.demos_per_prompt, rng),
             "test_pairs": world.make_pairs(test, 2, 0.0, rng)}
    for seed in scale.seeds:
        rng = random.Random(seed)
        files[f"train_pairs_s{seed}"] = world.make_pairs(train_prompts, scale.pairs_per_prompt,
                                                         world.label_temperature, rng)
        # As many sequences as the pairs hold, one per item.
        files[f"train_unpaired_s{seed}"] = world.make_unpaired(train_prompts, 2 * scale.pairs_per_prompt,
                                                               world.label_temperature, rng)
    os.makedirs(os.path.join(work, "world"), exist_ok=True)
    for name, rows in files.items():
        with open(os.path.join(work, "world", f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    for name, prompts in (("valid_prompts", valid), ("test_prompts", test)):
        with open(os.path.join(work, "world", f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(asdict(p)) + "\n" for p in prompts)
    first = scale.seeds[0]
    print(f"{len(train_prompts)} training prompts ({len(files[f'train_pairs_s{first}'])} pairs and "
          f"{len(files[f'train_unpaired_s{first}'])} unpaired items per seed, "
          f"{len(files['demonstrations'])} warm-up replies); {len(valid)} validation and {len(test)} test prompts; "
          f"{len(files['test_pairs'])} test pairs; files in {os.path.join(work, 'world')}")

    say("tokenizer, a random tiny Llama, HF -> Megatron conversion")
    texts = [r["prompt"] + " " + r["chosen"] + " " + r["rejected"] for r in files["demonstrations"]]
    sp_model = train_sentencepiece(texts, os.path.join(work, "tokenizer"), vocab_size=scale.vocab_size)
    pipe.write_recipe()
    hf_init = os.path.join(work, "hf_init")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**hf_config_from_model(load_config(pipe.recipe).model))).save_pretrained(hf_init)
    shutil.copy(sp_model, os.path.join(hf_init, "tokenizer.model"))
    init = os.path.join(work, "megatron_init")
    convert_hf_to_megatron(hf_init, init, progress=False)

    say("preprocessing and prompt embeddings")
    prefixes = {}
    for name in files:
        if name == "test_pairs":
            continue  # evaluated with transformers, never trained on
        fmt = "unpaired" if name.startswith("train_unpaired") else "pairs"
        prefix = os.path.join(work, "data", name)
        m = preprocess([os.path.join(work, "world", f"{name}.jsonl")], fmt, sp_model, prefix,
                       max_prompt_length=48, max_length=80, progress=False).manifest
        if name != "demonstrations":
            precompute_prompt_embeddings(prefix, progress=False)
        print(f"{name}: {m['num_sequences']} sequences -> {prefix}.* ({len(m['skipped'])} rows skipped)")
        prefixes[name] = prefix
    return {"sp_model": sp_model, "init": init, "prefixes": prefixes, "valid": valid, "test": test,
            "test_pairs": files["test_pairs"], "checks": checks}


def overrides_for(run: Run, scale: Scale, paths: dict, warmup_export: str) -> list[str]:
    _, loss, unpaired = METHODS[run.method]
    per_step = scale.pairs_per_step * (2 if unpaired else 1)  # unpaired: as many sequences as the pairs
    micro = run.micro * (2 if unpaired else 1)
    data = paths["prefixes"][f"train_{'unpaired' if unpaired else 'pairs'}_s{run.seed}"]
    return [*loss, f"data.train_data_prefix={data}", f"data.paired={not unpaired}",
            f"train.load={warmup_export}", f"train.train_iters={scale.steps}", f"optimizer.lr={run.lr}",
            f"train.global_batch_size={per_step}", f"train.micro_batch_size={micro}",
            f"train.seed={run.seed}", f"data.seed={run.seed}", f"loss.contrast_scope={run.scope}"]



def runs_of(results: dict, scale: Scale, world: int, method: str, lr: float, micro: int | None = None,
            nproc: int = 1, scope: str = "data_parallel") -> list[dict]:
    """The runs of one setting in one world, one per seed."""
    micro = scale.pairs_per_step if micro is None else micro
    return [results[Run(world, method, lr, s, micro, nproc, scope).name] for s in scale.seeds]


def run_world(pipe: Pipeline, scale: Scale, world, results: dict, study: bool) -> dict:
    """One world: its data, its warm-up, every method x learning rate x seed, and (``study``) the
    batch-size study. Adds every run's metrics to ``results``; returns the world's checks, warm-up
    metrics and chosen learning rates."""
    paths = prepare(pipe, scale, world)
    say(f"world {world.seed}: supervised warm-up on the base policy's replies ({scale.warmup_steps} steps)")
    warm_dir = os.path.join(pipe.work, "warmup")
    seconds = pipe.train(warm_dir, 1, [f"data.train_data_prefix={paths['prefixes']['demonstrations']}",
                                       f"train.load={paths['init']}", "loss.loss_type=sft",
                                       f"train.train_iters={scale.warmup_steps}", f"optimizer.lr={scale.warmup_lr}",
                                       "train.global_batch_size=16", "train.micro_batch_size=16",
                                       "train.log_interval=50"])
    warmup_export = os.path.join(warm_dir, "export")
    evaluator = Evaluator(world, paths["sp_model"], paths["test"], paths["valid"], paths["test_pairs"],
                          pipe.export(warm_dir))
    warm = evaluator.evaluate(os.path.join(warm_dir, "hf"))
    print(f"warm-up: {seconds:.0f} s; judge reward on test prompts {warm['test_reward']:.2f} of "
          f"{worlds.MAX_REWARD:.0f}; lead rule {warm['lead_rule']:.2f}, closing rule {warm['closing_rule']:.2f}, "
          f"well formed {warm['well_formed']:.2f}")
    lock = threading.Lock()
    counter = {"done": 0}

    def execute(runs: list[Run]) -> None:
        total = len(runs)
        counter["done"] = 0

        def one(run: Run) -> None:
            run_dir = os.path.join(pipe.work, "runs", run.name)
            seconds = pipe.train(run_dir, run.nproc, overrides_for(run, scale, paths, warmup_export))
            metrics = evaluator.evaluate(pipe.export(run_dir))
            metrics["train_seconds"] = seconds
            for entry in os.listdir(run_dir):  # keep the export, not the resumable state
                path = os.path.join(run_dir, entry)
                if entry.startswith("iter_"):
                    shutil.rmtree(path)
                elif entry == "latest":
                    os.remove(path)
            with lock:
                results[run.name] = dict(asdict(run), **metrics)
                counter["done"] += 1
                print(f"[world {run.world}: {counter['done']}/{total}] {METHODS[run.method][0]}, lr {run.lr:g}, "
                      f"seed {run.seed}, {run.micro} per rank x {run.nproc} rank(s) ({run.scope}): "
                      f"win rate {metrics['test_win_rate']:.2f}, reward {metrics['test_reward']:.2f}, "
                      f"well formed {metrics['well_formed']:.2f}, ranking {metrics['ranking_accuracy']:.2f}, "
                      f"validation reward {metrics['valid_reward']:.2f} ({seconds:.0f} s)", flush=True)

        # Runs on 2 ranks take both cores: run them alone.
        wide = [r for r in runs if r.nproc > 1]
        narrow = [r for r in runs if r.nproc == 1]
        with ThreadPoolExecutor(max_workers=max(1, scale.jobs)) as pool:
            list(pool.map(one, narrow))
        for run in wide:
            one(run)

    grid = [Run(world.seed, m, lr, s, scale.pairs_per_step) for m in scale.methods for lr in scale.lrs
            for s in scale.seeds]
    say(f"world {world.seed}: {len(grid)} preference runs")
    execute(grid)
    chosen_lr = {m: max(scale.lrs, key=lambda lr: statistics.mean(
        r["valid_reward"] for r in runs_of(results, scale, world.seed, m, lr))) for m in scale.methods}
    if study and STUDY_METHOD not in scale.methods:
        print(f"no batch-size study: it runs {STUDY_METHOD}, which --methods left out")
        study = False
    if study:
        lr = chosen_lr[STUDY_METHOD]
        runs = [Run(world.seed, STUDY_METHOD, lr, s, micro, nproc, scope) for micro, nproc, scope in scale.study
                for s in scale.seeds]
        say(f"world {world.seed}: batch-size study, {len(runs)} runs of {METHODS[STUDY_METHOD][0]} at lr {lr:g}")
        execute(runs)
    return {"description": world.describe(), "checks": paths["checks"], "warmup": warm, "chosen_lr": chosen_lr,
            "study": study}


