"""Does RPO learn what its preferences say? A miniature reproduction with ground-truth judges, over worlds.

The worlds (``bench/preference_world.py``, described in ``bench/REPRODUCTION.md``): English
requests from topics in groups; the judge scores a reply by relevance and by two rules of the
prompt's group that only the preferences teach. World 0 is the hand-built one; the others are
drawn from a seed (groups, topics, words, the base policy's habit, the label noise), so a
conclusion has to hold in worlds nobody tuned. For every world, one command runs it all through
the real pipeline:

1. the world's files (the preferences drawn anew for every seed), checked as world 0 was (the
   base policy's habits wrong in every group, labels agreeing with the judge at the rate the
   temperature states, held-out prompts new wordings); a sentencepiece tokenizer, a random tiny
   Llama (HF), HF -> Megatron conversion, preprocessing (paired, unpaired, warm-up corpus) and
   all-MiniLM-L6-v2 prompt embeddings;
2. a supervised warm-up on the base policy's replies (``python -m megatron_rpo.train``, sft);
3. from that same start, every method, every learning rate of one grid, every seed: DPO, RPO paired
   with embedding / uniform weights (rows summing to 1, and rows averaging 1), RPO unpaired, KTO
   on the same unpaired items, IPO and SimPO (diagonal weights and SimPO+RPO on request); each a
   ``torchrun -m megatron_rpo.train`` run (the warm-up is the online reference) exported back to
   Hugging Face; two runs at a time on CPU, one process each;
4. in the first world only, the batch-size study for RPO with embedding weights and rows
   averaging 1 at its chosen learning rate: the contrast matrix over 2, 4 and 8 pairs per rank with
   8 pairs per step, and 2 data-parallel ranks of 4 pairs each, their matrix gathered (8 x 8) or
   kept per rank (``contrast_scope: local``, 4 x 4);
5. evaluation with transformers on held-out prompts (their exact wording never trained on): the
   judge's win rate of each model's greedy reply against the warm-up's (ties count half), the
   judge's mean reward, how often each group rule is followed, how many replies keep the world's
   shape, and the held-out preference ranking accuracy (pairs labelled by the judge without
   noise; a pair is ranked right when the model's log-ratio against the warm-up is larger for the
   better reply);
6. ``results.md`` (pooled tables over worlds and seeds, collapse rates, per-world tables),
   ``reproduction.png`` and ``results.json`` in the run folder.

Tuning, the same for every method: the learning rate is chosen per method *and world* from one
grid by the mean judge reward on that world's *validation* prompts (separate from the test prompts
the tables report), averaged over seeds; steps, batch, beta (0.1; SimPO 2.0 with gamma 0.5), the
optimizer and the seeds are fixed. Contrast weights use the paper's defaults (tau 0.5 paired,
0.75 unpaired; alpha 0.8; rows summing to 1). A run *collapses* when fewer than half of its greedy
test replies keep the world's shape; collapse is counted per method and learning rate, not
averaged away. A seed draws the preference data and orders it; the warm-up is shared in a world.

    python bench/reproduction.py                 # 6 worlds x 4 seeds, about 80 minutes on 2 CPU cores
    python bench/reproduction.py --worlds 2 --seeds 2
    python bench/reproduction.py --quick         # the harness end to end (2 worlds) in about 2 minutes
    python bench/reproduction.py --gpu           # a larger model and budget on CUDA
"""

from __future__ import annotations

import argparse
import json
import math
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

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "examples"))

import preference_world as worlds  # noqa: E402
from quickstart import prepare_workdir  # noqa: E402

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

    worlds: tuple = (0, 1, 2, 3, 4, 5)  # bench/preference_world.py's seeds (0: the hand-built world)
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


# ---------------------------------------------------------------------------------------------
# Evaluation with transformers: greedy replies, the judge, ranking accuracy


class Evaluator:
    """Judges exported models against the warm-up, with transformers: independent of the trainer's code."""

    def __init__(self, world, sp_model: str, test: list, valid: list, test_pairs: list[dict], warmup_hf: str):
        from megatron_rpo.data.tokenizer import load_tokenizer

        self.world = world
        self.tok = load_tokenizer(sp_model)
        self.test, self.valid, self.test_pairs = test, valid, test_pairs
        self.warmup = self.load(warmup_hf)
        self.warmup_replies = {split: self.replies(self.warmup, prompts)
                               for split, prompts in (("test", test), ("valid", valid))}
        self.warmup_logps = self.response_logps(self.warmup)

    @staticmethod
    def load(hf_dir: str):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

    def prompt_ids(self, text: str) -> list[int]:
        return [self.tok.bos_id] + self.tok.encode(text)  # as preprocessing builds the prompt

    @torch.no_grad()
    def replies(self, model, prompts: list, max_new_tokens: int = 24) -> list[str]:
        """Greedy replies, prompts of one length batched together (no padding, so no mask subtleties)."""
        by_length: dict[int, list[int]] = {}
        ids = [self.prompt_ids(p.text) for p in prompts]
        for k, row in enumerate(ids):
            by_length.setdefault(len(row), []).append(k)
        out = [""] * len(prompts)
        for length, members in by_length.items():
            batch = torch.tensor([ids[k] for k in members])
            gen = model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=self.tok.eos_id, pad_token_id=self.tok.eos_id)
            for k, row in zip(members, gen[:, length:].tolist()):
                if self.tok.eos_id in row:
                    row = row[: row.index(self.tok.eos_id)]
                out[k] = self.tok.decode(row)
        return out

    @torch.no_grad()
    def response_logps(self, model) -> torch.Tensor:
        """Summed log-probs of every test pair's [chosen, rejected] response (and eos), [pairs, 2]."""
        seqs, starts = [], []
        for row in self.test_pairs:
            prompt = self.prompt_ids(row["prompt"])
            for key in ("chosen", "rejected"):
                seqs.append(prompt + self.tok.encode(row[key]) + [self.tok.eos_id])
                starts.append(len(prompt))
        width = max(map(len, seqs))
        tokens = torch.tensor([s + [self.tok.eos_id] * (width - len(s)) for s in seqs])  # [n, s]
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        for k, (s, start) in enumerate(zip(seqs, starts)):
            mask[k, start : len(s)] = True
        logits = model(tokens, attention_mask=torch.ones_like(tokens)).logits[:, :-1].float()  # right padding
        logp = torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None])[..., 0]  # [n, s-1]
        return (logp * mask[:, 1:]).sum(-1).view(-1, 2)

    def evaluate(self, hf_dir: str) -> dict:
        model = self.load(hf_dir)
        out = {}
        for split, prompts in (("test", self.test), ("valid", self.valid)):
            replies = self.replies(model, prompts)
            rewards = [self.world.judge(p, r) for p, r in zip(prompts, replies)]
            base = [self.world.judge(p, r) for p, r in zip(prompts, self.warmup_replies[split])]
            out[f"{split}_reward"] = statistics.mean(rewards)
            out[f"{split}_win_rate"] = statistics.mean(1.0 if a > b else 0.5 if a == b else 0.0
                                                       for a, b in zip(rewards, base))
            if split == "test":
                out.update(rule_rates(self.world, prompts, replies))
                out["examples"] = [{"prompt": p.text, "reply": r, "reward": x}
                                   for p, r, x in list(zip(prompts, replies, rewards))[:: max(1, len(prompts) // 6)]]
        ratio = self.response_logps(model) - self.warmup_logps  # [pairs, 2]
        out["ranking_accuracy"] = ((ratio[:, 0] > ratio[:, 1]).float().mean()
                                   + 0.5 * (ratio[:, 0] == ratio[:, 1]).float().mean()).item()
        out["ranking_margin"] = (ratio[:, 0] - ratio[:, 1]).mean().item()  # nats, better minus worse reply
        return out


def rule_rates(world, prompts: list, replies: list[str]) -> dict:
    """How often the replies have the world's shape, and follow each of the judge's rules."""
    lead = closing = on_topic = shaped = 0
    for p, r in zip(prompts, replies):
        parts = world.parse(r)
        if parts is not None:
            want_lead, want_closing = world.groups[world.group(p)][:2]
            shaped += 1
            lead += parts[0] == want_lead
            on_topic += world.item_topic.get(parts[1]) == p.topic
            closing += parts[2] == want_closing
    n = len(prompts)
    return {"lead_rule": lead / n, "closing_rule": closing / n, "on_topic": on_topic / n, "well_formed": shaped / n}


# ---------------------------------------------------------------------------------------------
# The experiment


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


def mean_se(values: list[float]) -> tuple[float, float]:
    m = statistics.mean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return m, se


def fmt(values: list[float], digits: int = 2, signed: bool = False) -> str:
    m, se = mean_se(values)
    mean = f"{m:+.{digits}f}" if signed else f"{m:.{digits}f}"
    return mean if math.isnan(se) else f"{mean} ± {se:.{digits}f}"


def collapsed(run: dict) -> bool:
    return run["well_formed"] < COLLAPSED_BELOW


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=os.path.join(REPO, "runs", "reproduction"))
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the harness end to end, small, two worlds, one seed")
    size.add_argument("--gpu", action="store_true", help="a larger model and budget, 5 seeds; CUDA")
    p.add_argument("--worlds", type=int, default=None,
                   help="worlds 0..K-1 of bench/preference_world.py (default 6; --quick 2)")
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
    prepare_workdir(work, marker=".megatron_rpo_reproduction", made_by="bench/reproduction.py")
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


def runs_of(results: dict, scale: Scale, world: int, method: str, lr: float, micro: int | None = None,
            nproc: int = 1, scope: str = "data_parallel") -> list[dict]:
    """The runs of one setting in one world, one per seed."""
    micro = scale.pairs_per_step if micro is None else micro
    return [results[Run(world, method, lr, s, micro, nproc, scope).name] for s in scale.seeds]


def _label(method: str) -> str:
    return METHODS[method][0]


def write_report(work, scale, per_world: dict, results: dict, minutes: float) -> str:
    """results.md: pooled tables, collapse, per-world tables and the study; results.json; the plot."""
    ws, seeds = list(per_world), len(scale.seeds)
    n = len(ws) * seeds

    def chosen(method: str, world: int) -> list[dict]:
        return runs_of(results, scale, world, method, per_world[world]["chosen_lr"][method])

    def pooled(method: str) -> list[dict]:
        return [r for w in ws for r in chosen(method, w)]

    lines = [f"{len(ws)} world(s) x {seeds} seed(s), {scale.steps} steps of {scale.pairs_per_step} pairs (16 items "
             f"unpaired), {minutes:.0f} minutes. Learning rate chosen per method and world from "
             f"{', '.join(f'{x:g}' for x in scale.lrs)} by the validation prompts' judge reward; the tables report "
             f"test prompts. Mean ± standard error over the {n} runs (worlds x seeds). A run has *collapsed* when "
             f"fewer than {COLLAPSED_BELOW:.0%} of its greedy test replies keep the world's shape.", "",
             "The worlds (the checks of bench/preference_world.py, and the warm-up on the test prompts):", "",
             "| world | groups x topics | habit | label temp. | labels agree with judge (stated) "
             "| warm-up reward | warm-up lead rule | warm-up closing rule |", "|---|---|---|---|---|---|---|---|"]
    for w in ws:
        c, warm = per_world[w]["checks"], per_world[w]["warmup"]
        lines.append(f"| {w} | {c['groups']} x {c['topics'] // c['groups']} | {c['habit']:.2f} "
                     f"| {c['label_temperature']:g} | {c['label_agreement']:.3f} ({c['label_agreement_stated']:.3f}) "
                     f"| {warm['test_reward']:.2f} | {warm['lead_rule']:.2f} | {warm['closing_rule']:.2f} |")
    lines += ["", "Pooled over worlds and seeds, each method at its chosen learning rate per world:", "",
              "| method | worlds beating DPO | win rate minus DPO's, paired (runs ahead) | win rate vs warm-up "
              "| win rate, runs not collapsed | collapsed | judge reward (of 3) | lead rule | closing rule "
              "| ranking accuracy |", "|---|---|---|---|---|---|---|---|---|---|"]

    def worlds_ahead(a: str, b: str) -> int:
        return sum(statistics.mean(r["test_win_rate"] for r in chosen(a, w)) >
                   statistics.mean(r["test_win_rate"] for r in chosen(b, w)) for w in ws)

    def paired(a: str, b: str) -> list[float]:
        """a's win rate minus b's, run by run: the same world and seed (one warm-up, one draw of the data)."""
        return [x["test_win_rate"] - y["test_win_rate"] for w in ws for x, y in zip(chosen(a, w), chosen(b, w))]

    for m in scale.methods:
        rs = pooled(m)
        kept = [r for r in rs if not collapsed(r)]
        beats = vs_dpo = "-"
        if m != "dpo" and "dpo" in scale.methods:
            diffs = paired(m, "dpo")
            beats = f"{worlds_ahead(m, 'dpo')} of {len(ws)}"
            vs_dpo = f"{fmt(diffs, digits=3, signed=True)} ({sum(x > 0 for x in diffs)} of {len(diffs)})"
        lines.append(f"| {_label(m)} | {beats} | {vs_dpo} | {fmt([r['test_win_rate'] for r in rs])} "
                     f"| {fmt([r['test_win_rate'] for r in kept]) if kept else '-'} ({len(kept)}) "
                     f"| {len(rs) - len(kept)} of {len(rs)} | {fmt([r['test_reward'] for r in rs])} "
                     f"| {fmt([r['lead_rule'] for r in rs])} | {fmt([r['closing_rule'] for r in rs])} "
                     f"| {fmt([r['ranking_accuracy'] for r in rs])} |")
    pairs = [(a, b, what) for a, b, what in COMPARISONS if a in scale.methods and b in scale.methods]
    if pairs:
        lines += ["", "The comparisons the conclusions rest on, run by run (the same world and seed, each method at "
                  "its chosen learning rate):", "",
                  "| comparison | win rate, first minus second | runs ahead / tied / behind | worlds ahead |",
                  "|---|---|---|---|"]
        for a, b, what in pairs:
            diffs = paired(a, b)
            lines.append(f"| {what}: {_label(a)} minus {_label(b)} | {fmt(diffs, digits=3, signed=True)} "
                         f"| {sum(x > 0 for x in diffs)} / {sum(x == 0 for x in diffs)} / {sum(x < 0 for x in diffs)} "
                         f"| {worlds_ahead(a, b)} of {len(ws)} |")
    lines += ["", "Every learning rate, pooled over worlds and seeds (test win rate; runs collapsed):", "",
              "| method | " + " | ".join(f"lr {x:g}" for x in scale.lrs) + " |", "|---|" + "---|" * len(scale.lrs)]
    for m in scale.methods:
        cells = []
        for lr in scale.lrs:
            rs = [r for w in ws for r in runs_of(results, scale, w, m, lr)]
            cells.append(f"{fmt([r['test_win_rate'] for r in rs])}; {sum(map(collapsed, rs))} of {len(rs)}")
        lines.append(f"| {_label(m)} | " + " | ".join(cells) + " |")
    for w in ws:
        lines += ["", f"W{per_world[w]['description'][1:]}. Mean ± standard error over seeds:", "",
                  "| method | lr | win rate vs warm-up | collapsed | judge reward | lead rule | closing rule "
                  "| ranking accuracy |", "|---|---|---|---|---|---|---|---|"]
        for m in scale.methods:
            rs = chosen(m, w)
            lines.append(f"| {_label(m)} | {per_world[w]['chosen_lr'][m]:g} | {fmt([r['test_win_rate'] for r in rs])} "
                         f"| {sum(map(collapsed, rs))} of {len(rs)} | {fmt([r['test_reward'] for r in rs])} "
                         f"| {fmt([r['lead_rule'] for r in rs])} | {fmt([r['closing_rule'] for r in rs])} "
                         f"| {fmt([r['ranking_accuracy'] for r in rs])} |")
    study_rows = []
    study_world = next((w for w in ws if per_world[w]["study"]), None)
    if study_world is not None:
        lr = per_world[study_world]["chosen_lr"][STUDY_METHOD]
        configs = [(scale.pairs_per_step, 1, "data_parallel"), *scale.study]
        lines += ["", f"Batch-size study (world {study_world}, {_label(STUDY_METHOD)}, lr {lr:g}, "
                  f"{scale.pairs_per_step} pairs per step in every row; only the contrast matrix changes):", "",
                  "| contrast matrix | M x N | win rate vs warm-up | judge reward | ranking accuracy |",
                  "|---|---|---|---|---|"]
        for micro, nproc, scope in sorted(configs, key=lambda c: (c[1], c[0], c[2])):
            side = micro * nproc if scope == "data_parallel" else micro  # the matrix spans the gathered ranks
            if nproc == 1:
                label = f"1 rank x {micro} pairs"
            else:
                kept = "gathered" if scope == "data_parallel" else "per rank (local)"
                label = f"{nproc} ranks x {micro} pairs, {kept}"
            rs = runs_of(results, scale, study_world, STUDY_METHOD, lr, micro, nproc, scope)
            study_rows.append((label, side, rs))
            lines.append(f"| {label} | {side}x{side} | {fmt([r['test_win_rate'] for r in rs])} "
                         f"| {fmt([r['test_reward'] for r in rs])} | {fmt([r['ranking_accuracy'] for r in rs])} |")
    report = "\n".join(lines) + "\n"
    with open(os.path.join(work, "results.md"), "w") as f:
        f.write(report)
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump({"scale": asdict(scale), "worlds": {str(w): v for w, v in per_world.items()},
                   "study_method": STUDY_METHOD, "collapsed_below": COLLAPSED_BELOW, "runs": results}, f, indent=1)
    plot(os.path.join(work, "reproduction.png"), {m: pooled(m) for m in scale.methods}, study_rows, len(ws))
    return report


def plot(path: str, per_method: dict, study_rows: list, worlds_count: int) -> None:
    """Win rate per method pooled over worlds (error bars: standard error over runs; the hollow bar
    leaves collapsed runs out); win rate against the matrix size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if study_rows else 1, figsize=(13 if study_rows else 8, 5), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2]} if study_rows else None)
    ax = axes[0, 0]
    x = range(len(per_method))
    stats = [mean_se([r["test_win_rate"] for r in rs]) for rs in per_method.values()]
    kept = [[r["test_win_rate"] for r in rs if not collapsed(r)] for rs in per_method.values()]
    ax.bar([i - 0.2 for i in x], [m for m, _ in stats], width=0.4, yerr=[0 if math.isnan(e) else e for _, e in stats],
           capsize=3, color="tab:blue", label="all runs")
    ax.bar([i + 0.2 for i in x], [statistics.mean(k) if k else 0 for k in kept], width=0.4, fill=False,
           edgecolor="tab:blue", label="runs not collapsed")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(list(x), [METHODS[m][0].replace("RPO paired, ", "RPO ") for m in per_method],
                  rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("judge win rate vs warm-up (ties half)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(f"held-out test prompts, {worlds_count} world(s) x seeds, mean ± s.e.")
    if study_rows:
        ax = axes[0, 1]
        for k, (label, side, rs) in enumerate(study_rows):
            m, e = mean_se([r["test_win_rate"] for r in rs])
            one_rank = label.startswith("1 rank")
            ax.errorbar([side * (1 if one_rank else 1.06 + 0.06 * k)], [m], yerr=[0 if math.isnan(e) else e],
                        marker="o" if one_rank else "s", capsize=4, ls="none",
                        color="tab:blue" if one_rank else f"C{k}", label=None if one_rank else label)
        singles = [(side, mean_se([r["test_win_rate"] for r in rs])[0]) for label, side, rs in study_rows
                   if label.startswith("1 rank")]
        ax.plot([x for x, _ in singles], [y for _, y in singles], color="tab:blue", label="1 rank")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("pairs in the contrast matrix (M = N)")
        ax.set_ylabel("judge win rate vs warm-up")
        ax.set_title(f"{METHODS[STUDY_METHOD][0]}:\nmatrix size (8 pairs per step)", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
