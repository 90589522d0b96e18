"""The equivalence harness (DESIGN 8, issue 31): a training layout from the space users run,
compared step by step with one process training the same global batch without it.

A :class:`Case` is a number of processes, a tiny model of one family and overrides of a recipe
(configs/tiny_cpu.yaml or a shipped one). The space it is drawn from:

* parallel layout: TP (with or without sequence parallelism), PP, VPP, CP, EP and ETP, DP, on 2
  or 4 processes; microbatches per step from 1 to several times the pipeline stages;
* data: packed or padded rows, paired or unpaired;
* loss: rpo (embedding, uniform or diagonal weights), dpo, ipo, simpo, simpo_rpo, kto, sft;
  ``contrast_scope`` local, data_parallel or global_batch; online or precomputed reference;
* memory levers: full or selective recompute, chunked log-probs, the distributed optimizer;
* model: dense Llama or Qwen3, Qwen3-MoE and Mixtral;
* training every weight, or low-rank adapters (``lora``; the single process trains the same ones,
  and the online reference is the model with its adapters off).

The independent computation (:func:`reference_overrides`) is one process, padded rows, no lever,
the same global batch and the same contrast matrices: a ``data_parallel`` matrix spans one
microbatch on every rank, so the single process takes microbatches DP times as large (the
samplers hand consecutive microbatches to consecutive ranks, so they hold the same sequences in
the same order); ``local`` and ``global_batch`` keep the micro batch size. :func:`compare` checks
every step's loss, rewards and the other metrics, its gradient norm, the rewards of step 1 (0: the
policy is the reference), the evaluation after training and the exported weights (with adapters
also the adapters, whose A's update the merged weights hide behind B).

Every run, the case's and the single process's, sets Adam's epsilon to :data:`ADAM_EPS` instead of
the recipe's 1e-8. At 1e-8 Adam's first update is the sign of each gradient element, so an element
at float-noise size (about 1e-8 after clipping) moves its weight by a whole learning rate one way or
the other, and in a mixture of experts a router weight moved so sends tokens to other experts from
then on (drawn case s571851, Mixtral packed against padded: expert weights' 3-step updates off by 1%,
as much on one process packed as at TP 2 x PP 2 x EP 2). With an epsilon above the noise the update
is a continuous function of the gradient (the same case: 7e-5), and a gradient wrongly scaled in one
tensor changes that tensor's update, which a sign does not.

What it does not compare, and where that is tested instead: the router's load-balancing loss
(per-microbatch, so it changes with the micro batch size; set to 0 here, compared at EP 2 vs EP 1
on the same microbatches in tests/functional/test_experts.py); KTO's reference point with a
``data_parallel`` scope over several ranks (each rank pairs its own microbatch's items, so the
mismatched pairs depend on DP; drawn, and the KTO recipe run, with ``local`` instead); the evaluation of a
``global_batch`` run over several data-parallel ranks (evaluation builds one matrix per
microbatch over the ranks, which a single process does not reproduce).

A case megatron or our config cannot run must be refused before any work, naming a setting;
:func:`compare` checks that refusal instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import traceback

import torch

from tests.workspace import RECIPE

__all__ = ["RUN_SEED", "SEEDS", "Case", "draw", "family_of", "recipe_case", "resumed", "reference_overrides",
           "evaluates", "prepare_world", "write_references", "run_cases", "compare"]

FAMILIES = ("llama", "qwen3", "qwen3_moe", "mixtral")
MOE = ("qwen3_moe", "mixtral")
SIZE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
             "vocab_size", "max_position_embeddings")
# Accuracy and reward AUC count the signs of reward differences, which float noise flips near a tie
# (at step 1 every reward is 0 up to it): they are not compared; the rewards they count are.
STEP_KEYS = ("loss", "chosen_reward", "rejected_reward", "reward_margin", "diag_weight", "row_entropy", "matrix_rows",
             "matrix_cols", "chosen_logps", "rejected_logps", "kl", "grad_norm", "lr")
LOSSES = (("rpo", "embedding"), ("rpo", "uniform"), ("rpo", "diagonal"), ("dpo", None), ("ipo", None),
          ("simpo", None), ("simpo_rpo", "embedding"), ("kto", None), ("sft", None))
MATRIX = ("rpo", "simpo_rpo")
REFERENCE_FREE = ("simpo", "simpo_rpo", "sft")
SAMPLES = int(os.environ.get("MEGATRON_RPO_EQUIVALENCE_SAMPLES", "12"))
"""Cases drawn on every run (the recipes' layouts come on top)."""
RUN_SEED = int(os.environ.get("MEGATRON_RPO_EQUIVALENCE_SEED") or random.SystemRandom().randrange(10**6))
"""This run's cases are drawn with seeds RUN_SEED, RUN_SEED + 1, ...; printed in pytest's header."""
SEEDS = ([int(s) for s in os.environ["MEGATRON_RPO_EQUIVALENCE_SEEDS"].split(",")]
         if os.environ.get("MEGATRON_RPO_EQUIVALENCE_SEEDS") else [RUN_SEED + k for k in range(SAMPLES)])
"""The seeds of the drawn cases: MEGATRON_RPO_EQUIVALENCE_SEEDS=s1,s2 reruns exactly those."""
ADAM_EPS = 1e-4
"""Adam's epsilon in every run (see the module docstring): above the float noise of a clipped
gradient element, below the size of most (the tiny models' clipped elements are about 3e-3)."""
MAX_SAMPLES = 192  # every case stays in the first epoch of the 200 training pairs, whatever its micro batch
REFUSAL = re.compile(r"\b(parallel|model|train|data|loss|optimizer)\.[a-z_]+")


@dataclasses.dataclass(frozen=True)
class Case:
    """One layout to compare with the single process.

    Attributes:
        name: shown in the test id (a sampled case carries its seed: ``s<seed>-...``).
        world: processes.
        family: the tiny model's family (:data:`FAMILIES`).
        overrides: dotted overrides of ``recipe``, sizes and paths aside.
        recipe: the recipe file.
        steps: training steps compared.
        stop: with ``resume``, the step the run stops at (``train.exit_interval``) ...
        resume: ... and the overrides it then resumes with (another layout), to end where one
            process ends without stopping.
    """

    name: str
    world: int
    family: str
    overrides: tuple[str, ...]
    recipe: str = RECIPE
    steps: int = 3
    stop: int = 0
    resume: tuple[str, ...] = ()

    def setting(self, key: str, default: str | None = None) -> str | None:
        """The value this case's overrides, else its recipe, give ``key`` (as text)."""
        for item in reversed(self.overrides):
            k, _, v = item.partition("=")
            if k == key:
                return v
        from megatron_rpo.config import load_config

        section, field = key.split(".")
        value = getattr(getattr(load_config(self.recipe), section), field)
        return default if value is None else str(value).lower() if isinstance(value, bool) else str(value)

    def number(self, key: str, default: int = 1) -> int:
        value = self.setting(key)
        return default if value in (None, "null", "None") else int(value)


def draw(seed: int, lora: bool | None = None) -> Case:
    """A case drawn from the space with ``seed`` alone (its name starts with ``s<seed>``); whether it
    trains low-rank adapters comes from a stream of its own (``lora`` decides it instead), so the
    cases of seeds drawn before adapters existed stay as they were."""
    g = random.Random(seed)
    family = g.choice(("llama", "llama", "qwen3", "qwen3_moe", "mixtral"))
    world = g.choice((2, 2, 4))
    tp = g.choice((1, 2))
    cp = g.choice([c for c in (1, 1, 2) if world % (tp * c) == 0])
    pp = g.choice([p for p in (1, 2, 4) if world % (tp * cp * p) == 0])
    vpp = 2 if pp == 2 and g.random() < 0.6 else None
    dp = world // (tp * pp * cp)
    loss, weighting = g.choice(LOSSES)
    paired = True if loss in ("dpo", "ipo", "simpo", "sft") or weighting == "diagonal" else \
        False if loss == "kto" else g.random() < 0.6
    scopes = ["local", "data_parallel"] + (["global_batch"] if loss in MATRIX else [])
    if loss == "kto" and dp > 1:
        scopes = ["local"]  # see the module docstring
    scope = g.choice(scopes)
    reference = "online" if loss == "kto" else g.choice(("online", "precomputed"))
    micro = g.choice((2, 4) if not paired else (1, 2, 4))
    stages = pp
    counts = [n for n in range(1, 3 * stages + 2) if vpp is None or n % pp == 0]
    counts = [n for n in counts if micro * dp * n * 3 <= MAX_SAMPLES] or [counts[0]]
    microbatches = g.choice(counts)
    steps = 3 if micro * dp * microbatches * 3 <= MAX_SAMPLES else 2
    o = [f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}",
         f"parallel.context_parallel_size={cp}", f"parallel.virtual_pipeline_model_parallel_size={vpp or 'null'}",
         f"parallel.sequence_parallel={'true' if tp > 1 and (family in MOE or g.random() < 0.5) else 'false'}",
         f"loss.loss_type={loss}", f"loss.contrast_scope={scope}", f"loss.reference={reference}",
         f"data.paired={'true' if paired else 'false'}",
         f"data.packing={'true' if cp > 1 or g.random() < 0.5 else 'false'}",
         f"optimizer.use_distributed_optimizer={'true' if g.random() < 0.5 else 'false'}",
         f"train.micro_batch_size={micro}", f"train.global_batch_size={micro * dp * microbatches}"]
    if weighting:
        o.append(f"loss.weighting={weighting}")
    if family in MOE:
        ep = g.choice([e for e in (1, 2, 4) if world % (e * pp) == 0])
        o.append(f"parallel.expert_model_parallel_size={ep}")
        if tp > 1 and g.random() < 0.5:
            o.append("parallel.expert_tensor_parallel_size=1")
    recompute = g.choice((None, "full", "selective"))
    if recompute == "full":
        o += ["model.recompute_granularity=full", "model.recompute_method=uniform", "model.recompute_num_layers=1"]
    elif recompute == "selective":
        o += ["model.recompute_granularity=selective", "model.recompute_modules=[core_attn]"]
    if g.random() < 0.4:
        o.append("model.logprob_chunk_tokens=48")
    if random.Random(f"lora-{seed}").random() < 0.3 if lora is None else lora:
        o += ["lora.rank=4", "lora.alpha=8"]
    words = [f"tp{tp}" + ("sp" if "parallel.sequence_parallel=true" in o else ""),
             f"pp{pp}" + (f"vpp{vpp}" if vpp else ""),
             f"cp{cp}", f"dp{dp}", *(("ep" if "expert_model" in x else "etp") + x.split("=")[1] for x in o
                                     if x.startswith(("parallel.expert_model", "parallel.expert_tensor"))),
             loss + (f"-{weighting}" if weighting else ""), scope, reference if loss not in REFERENCE_FREE else "",
             "paired" if paired else "unpaired", "packed" if "data.packing=true" in o else "padded",
             f"mbs{micro}x{microbatches}", recompute or "", "chunked" if "model.logprob_chunk_tokens=48" in o else "",
             "distopt" if "optimizer.use_distributed_optimizer=true" in o else "",
             "lora" if "lora.rank=4" in o else ""]
    short = "-".join(w for w in words if w)
    return Case(f"s{seed}-{family}-w{world}-{short}", world, family, tuple(o), steps=steps)


def family_of(recipe: str) -> str:
    """The family of the tiny model a recipe trains: the file name's (qwen3, mixtral), a Qwen3
    recipe with expert parallelism Qwen3-MoE, Llama otherwise."""
    from megatron_rpo.config import load_config

    name = os.path.basename(recipe)
    if name.startswith("mixtral"):
        return "mixtral"
    if name.startswith("qwen3"):
        return "qwen3_moe" if load_config(recipe).parallel.expert_model_parallel_size > 1 else "qwen3"
    return "llama"


def recipe_case(recipe: str) -> Case:
    """A shipped recipe's layout on 2-4 processes: each parallel kind it uses at size 2 (TP with its
    sequence parallelism, PP with VPP, CP, EP with its ETP), DP 2 beside them where it fits in 4
    processes, and 4 microbatches per pipeline stage (3 without a pipeline, 6 at DP 1: never as
    many as the stages or the ranks). Its loss, reference, packing, recompute, chunking and
    optimizer are the recipe's own."""
    from megatron_rpo.config import load_config

    c = load_config(recipe)
    p = c.parallel
    name = os.path.basename(recipe).removesuffix(".yaml")
    family = family_of(recipe)
    tp, pp, cp = (2 if n > 1 else 1 for n in (p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                                              p.context_parallel_size))
    dp = 2
    if tp * pp * cp * dp > 4:  # 4 processes at most: a pipeline keeps its DP, the rest drop it
        tp, dp = (1, 2) if pp > 1 else (tp, 1)
    micro = min(c.train.micro_batch_size, 2)
    microbatches = 4 * pp if pp > 1 else 3 if dp > 1 else 6
    o = [f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}",
         f"parallel.context_parallel_size={cp}", f"train.micro_batch_size={micro}",
         f"train.global_batch_size={micro * dp * microbatches}"]
    if c.loss.uses_mismatched and dp > 1:
        o.append("loss.contrast_scope=local")  # KTO: see the module docstring
    if p.virtual_pipeline_model_parallel_size:
        o.append("parallel.virtual_pipeline_model_parallel_size=2")
    if tp == 1:
        o.append("parallel.sequence_parallel=false")
    if p.expert_model_parallel_size > 1:
        o.append("parallel.expert_model_parallel_size=2")
    steps = 3 if micro * dp * microbatches * 3 <= MAX_SAMPLES else 2
    return Case(name, tp * pp * cp * dp, family, tuple(o), recipe=recipe, steps=steps)


def resumed(case: Case, stop: int, *overrides: str) -> Case:
    """``case`` stopped after ``stop`` steps and resumed with ``overrides``."""
    words = "-".join(o.split(".", 1)[1].replace("_model_parallel_size", "") for o in overrides)
    return dataclasses.replace(case, name=f"{case.name}-resumed-at-{words}", stop=stop, resume=overrides)


def reference_overrides(case: Case) -> tuple[str, ...]:
    """The single process's overrides for ``case`` (see the module docstring)."""
    tp, pp, cp = (case.number(f"parallel.{k}_parallel_size") for k in ("tensor_model", "pipeline_model", "context"))
    dp = case.world // (tp * pp * cp)
    micro = case.number("train.micro_batch_size")
    if case.setting("loss.contrast_scope") == "data_parallel":
        micro *= dp
    return (*case.overrides, "parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1",
            "parallel.context_parallel_size=1", "parallel.virtual_pipeline_model_parallel_size=null",
            "parallel.sequence_parallel=false", "parallel.expert_model_parallel_size=1",
            "parallel.expert_tensor_parallel_size=null", "data.packing=false",
            "optimizer.use_distributed_optimizer=false", "model.recompute_granularity=null",
            "model.recompute_method=null", "model.recompute_num_layers=null", "model.recompute_modules=null",
            "model.logprob_chunk_tokens=null", f"train.micro_batch_size={micro}")


def evaluates(case: Case) -> bool:
    """Whether the case's evaluation is compared (see the module docstring): not that of a
    ``global_batch`` run over several data-parallel ranks, in either of its layouts."""
    if case.setting("loss.contrast_scope") != "global_batch":
        return True
    for layout in (case, dataclasses.replace(case, overrides=case.overrides + case.resume)):
        tp, pp, cp = (layout.number(f"parallel.{k}_parallel_size") for k in ("tensor_model", "pipeline_model",
                                                                            "context"))
        if case.world != tp * pp * cp:
            return False
    return True


# -- the worlds: tiny checkpoints and their datasets ------------------------------------------------

def prepare_world(root, workspace: dict, tokenizer: str) -> dict:
    """A tiny checkpoint of every family (configs/tiny_cpu.yaml's shape; Llama with the Llama-3
    recipes' RoPE base and norm epsilon) and a copy of the workspace's datasets for each (their
    reference log-probs are written by :func:`run_cases` on one process)."""
    import glob
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_rpo.config import load_config
    from megatron_rpo.convert import convert_hf_to_megatron
    from tests.workspace import family_checkpoint

    m = load_config(RECIPE).model
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=workspace["vocab"], hidden_size=m.hidden_size,
                                 intermediate_size=m.ffn_hidden_size, num_hidden_layers=m.num_layers,
                                 num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_query_groups,
                                 max_position_embeddings=m.max_position_embeddings, rms_norm_eps=1e-5,
                                 rope_theta=500000.0)).save_pretrained(root / "llama" / "hf")
    shutil.copy(tokenizer, root / "llama" / "hf" / "tokenizer.model")
    convert_hf_to_megatron(str(root / "llama" / "hf"), str(root / "llama" / "ckpt"), progress=False)
    families = {"llama": str(root / "llama" / "ckpt")}
    for kind in FAMILIES[1:]:
        families[kind] = family_checkpoint(root, kind, workspace["vocab"], tokenizer)
    for kind in FAMILIES:
        for split in ("train", "valid"):
            for f in glob.glob(str(workspace["root"] / f"{split}.*")):
                if not f.endswith(f"{split}.jsonl") and ".ref." not in f:
                    shutil.copy(f, root / kind)
    return {"root": root, "vocab": workspace["vocab"], "checkpoints": families}


def argv(world: dict, case: Case, overrides: tuple[str, ...], save, *last: str) -> list[str]:
    """``overrides`` of ``case.recipe`` with the tiny sizes, the family's paths and a short run
    (then ``last``)."""
    from megatron_rpo.config import MODEL_TRAINING_CHOICES, explicit_keys, load_config
    from megatron_rpo.convert.files import ConvertedCheckpoint

    said = explicit_keys(load_config(case.recipe)) or frozenset()
    tiny = load_config(RECIPE).model
    data = world["root"] / case.family
    out = [f"model.{k}={world['vocab'] if k == 'vocab_size' else getattr(tiny, k)}"
           for k in SIZE_KEYS if f"model.{k}" in said or case.recipe == RECIPE]
    # The rest of the architecture the recipe sets (a norm epsilon, a RoPE base) is the family's
    # tiny checkpoint's: the harness compares layouts, not architectures.
    theirs = ConvertedCheckpoint(world["checkpoints"][case.family]).model_config
    out += [f"{k}={json.dumps(getattr(theirs, k.split('.')[1]))}" for k in sorted(said)
            if k.startswith("model.") and k.split(".")[1] not in (*SIZE_KEYS, *MODEL_TRAINING_CHOICES)]
    if "data.max_prompt_length" in said:
        out.append("data.max_prompt_length=96")
    if case.family in MOE:
        out.append("model.moe_aux_loss_coeff=0.0")  # see the module docstring
    valid = f"data.valid_data_prefix={data / 'valid'}" if evaluates(case) else "data.valid_data_prefix=null"
    return [*out, "data.max_length=160", f"optimizer.adam_eps={ADAM_EPS}",
            f"train.load={world['checkpoints'][case.family]}",
            f"data.train_data_prefix={data / 'train'}", valid, *overrides, f"train.save={save}",
            f"train.train_iters={case.steps}", "train.save_interval=null", "train.eval_interval=null",
            "train.eval_iters=null", "train.exit_interval=null", f"train.log_interval={case.steps}",
            "train.tensorboard_dir=null", "train.wandb_project=null", "parallel.distributed_timeout_minutes=1", *last]


def write_references(world: dict) -> None:
    """Every family's reference log-probs (train and valid), on this one process."""
    from megatron.core import parallel_state

    from megatron_rpo import parallel
    from megatron_rpo.config import Config, DataConfig
    from megatron_rpo.models import model_provider
    from megatron_rpo.training.checkpointing import checkpoint_model_config, load_weights
    from megatron_rpo.training.reference import compute_reference_logps

    for kind, ckpt in world["checkpoints"].items():
        config = Config(model=checkpoint_model_config(ckpt), data=DataConfig(max_prompt_length=96, max_length=160))
        parallel.initialize(config.parallel)
        model = model_provider(config)
        load_weights(model, ckpt)
        for split in ("train", "valid"):
            compute_reference_logps(model, str(world["root"] / kind / split), checkpoint=ckpt, progress=False)
        parallel_state.destroy_model_parallel()


def run_cases(world: dict, runs: list[tuple[Case, tuple[str, ...], str]], references: bool = False) -> list[dict]:
    """Train each ``(case, overrides, save)`` in these processes, one after another; per run its
    history, last evaluation and export folder, ``{"refused": message}`` for a run refused before
    its first step, or ``{"error": traceback}`` (the runs after a failure other than a refusal are
    not attempted: the ranks may no longer agree on where they are). With ``references``, first the reference
    log-probs of every family."""
    from megatron.core import parallel_state

    from megatron_rpo.config import load_config
    from megatron_rpo.convert.peft import save_peft_adapter
    from megatron_rpo.training.trainer import Trainer

    if references:
        write_references(world)
    out = []
    for case, overrides, save in runs:
        if out and out[-1].get("fatal"):
            out.append({"error": "not run: an earlier case in the same processes failed", "fatal": True})
            continue
        trainer, history = None, []
        try:
            if case.resume and overrides == case.overrides:  # the run that stops, then the resumed one
                trainer = Trainer(load_config(case.recipe, argv(world, case, overrides, save,
                                                                f"train.exit_interval={case.stop}")))
                trainer.train()
                history = trainer.history
                trainer.close(keep_process_group=True)
                trainer = None
                trainer = Trainer(load_config(case.recipe, argv(world, case, overrides + case.resume, save,
                                                                "train.allow_config_change=true")))
            else:
                try:
                    trainer = Trainer(load_config(case.recipe, argv(world, case, overrides, save)))
                except ValueError as e:
                    out.append({"refused": str(e)})
                    continue
                c = trainer.config
                if c.lora.enabled:  # the adapters as drawn, before any step: what their updates start from
                    save_peft_adapter(trainer.module, os.path.join(save, "adapter_start"), c.model, c.lora,
                                      c.train.load)
            evaluation = trainer.train()
            out.append({"history": history + trainer.history, "eval": evaluation,
                        "export": os.path.join(save, "export")}
                       | ({"adapter": save} if trainer.config.lora.enabled else {}))
        except Exception as e:  # noqa: BLE001 - reported by the case's test
            # A refusal reaches every rank alike; anything else may leave the ranks out of step.
            out.append({"error": traceback.format_exc(), "fatal": not isinstance(e, ValueError)})
        finally:
            if trainer is not None:
                trainer.close(keep_process_group=True)
            else:
                parallel_state.destroy_model_parallel()
    return out


# -- the law --------------------------------------------------------------------------------------

FIRST_STEP = {"rel": 2e-4, "abs_": 2e-5}
"""Step 1: the starting weights' forward and the first gradients (its grad_norm), at fp32 noise."""
LATER = {"rel": 5e-4, "abs_": 5e-5}
"""Later steps and the evaluation: the first update carried the fp32 noise of another layout's sums
(packed against padded rows, TP/PP reductions: about 2e-5 of a gradient) into the weights, and a
reward is beta times a difference of summed log-probs of about -350 nats, so it moves by about 1e-4
(measured over the recipes' layouts and 13 drawn cases, Adam's epsilon at :data:`ADAM_EPS`: at most
0.15 of this tolerance, a KL estimate of KTO's at step 2; at epsilon 1e-8 s377159's rewards were
off by 4e-4 at step 2). A wrong gradient shows at step 1's grad_norm and in every exported update
(compared below)."""


def _close(got: float, want: float, *, rel: float, abs_: float) -> bool:
    if want != want:  # NaN: a metric that does not exist for this loss or data
        return got != got
    return abs(got - want) <= abs_ + rel * abs(want)


def compare(case: Case, got: dict, want: dict) -> None:
    """Assert that ``got`` (the case's run) is ``want`` (the single process's), or a refusal before
    any work that names a setting."""
    from megatron_rpo.convert.files import ConvertedCheckpoint

    assert "error" not in got, f"{case.name} failed:\n{got['error']}"
    # One process refusing the case's settings would make it compare nothing (a wrong draw).
    assert "error" not in want and "refused" not in want, f"the single process of {case.name}: {want}"
    if "refused" in got:
        assert REFUSAL.search(got["refused"]), f"{case.name} was refused without naming a setting: {got['refused']}"
        return
    steps = [h["step"] for h in got["history"]]
    assert steps == [h["step"] for h in want["history"]] == list(range(1, case.steps + 1))
    problems = []
    for a, b in zip(want["history"], got["history"]):
        tolerance = FIRST_STEP if a["step"] == 1 else LATER
        for key in STEP_KEYS:
            if key in a or key in b:
                if not _close(float(b.get(key, "nan")), float(a.get(key, "nan")), **tolerance):
                    problems.append(f"step {a['step']} {key}: {b.get(key)} but one process {a.get(key)}")
    first = got["history"][0]
    if case.setting("loss.loss_type") not in REFERENCE_FREE:  # step 1: the policy is the reference
        for key in ("chosen_reward", "rejected_reward"):
            if abs(first[key]) > 1e-5:
                problems.append(f"step 1 {key} is {first[key]}, not 0")
    for key in sorted(k for k in set(want["eval"]) | set(got["eval"]) if k in STEP_KEYS):
        if not _close(float(got["eval"].get(key, "nan")), float(want["eval"].get(key, "nan")), **LATER):
            problems.append(f"evaluation {key}: {got['eval'].get(key)} but one process {want['eval'].get(key)}")
    # Each tensor's update is compared as a whole: a few elements whose gradients are near 0 still
    # move at about the learning rate, where noise decides part of their update.
    x, y = ConvertedCheckpoint(want["export"]), ConvertedCheckpoint(got["export"])
    start = ConvertedCheckpoint(x.meta["source"])  # the checkpoint both started from
    assert sorted(x.index) == sorted(y.index)
    for name in x.index:
        a, b, a0 = x.get(name).double(), y.get(name).double(), start.get(name).double()
        update, error = (a - a0).norm().item(), (b - a).norm().item()
        if error > 1e-2 * update + 1e-7:
            problems.append(f"exported {name}: its update differs from one process's by {error:.3g} "
                            f"(the update: {update:.3g})")
    if "adapter" in want:
        # The adapters themselves: in the merged weights A's update hides behind B (which starts at
        # 0), so a wrong gradient of A shows only here. The single process's run holds their start.
        from safetensors.torch import load_file

        x, y, start = (load_file(os.path.join(folder, "adapter_model.safetensors")) for folder in
                       (os.path.join(want["adapter"], "adapter"), os.path.join(got["adapter"], "adapter"),
                        os.path.join(want["adapter"], "adapter_start")))
        assert sorted(x) == sorted(y) == sorted(start)
        for name in x:
            a, b, a0 = x[name].double(), y[name].double(), start[name].double()
            update, error = (a - a0).norm().item(), (b - a).norm().item()
            if error > 1e-2 * update + 1e-7:
                problems.append(f"adapter {name}: its update differs from one process's by {error:.3g} "
                                f"(the update: {update:.3g})")
    assert not problems, f"{case.name}: " + "; ".join(problems[:12])
