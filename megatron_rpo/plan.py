"""Will it fit? Per-GPU memory of a run, from its config and the checkpoint's metadata, before queueing.

    python -m megatron_rpo.plan --config configs/X.yaml [section.key=value ...] --gpus 64 --gpu-memory-gib 80

No GPU is needed and no weight is read: the model is the converted checkpoint's (``train.load``'s
metadata, as training completes it), or a Hugging Face model's config.json (``--hf-config``) before
conversion, or the config's as written. For the pipeline
stage that needs the most, it prints:

* parameters (counted exactly as megatron builds this rank's part: tensor, pipeline and expert
  parallel splits, vocabulary padding, tied embeddings), their gradients (megatron's DDP keeps a
  float32 buffer) and the optimizer state (float32 master weights and Adam's two moments, split
  over the data-parallel ranks with the distributed optimizer);
* activations of one microbatch, per layer from the tensors our layers keep for backward (flash
  attention: no [s, s] scores), under the recompute setting, times the microbatches alive at
  once on that stage under megatron's schedule (1F1B, or interleaved with its longer warm-up);
* the logits (whole, or one chunk with ``model.logprob_chunk_tokens``) and the online reference's
  weights; under context parallelism a CP rank's share of the tokens;
* with low-rank adapters (``lora``): the adapters' weights, and gradients and optimizer state for
  them only; no reference copy (the base is the reference). Their activations (``rank`` numbers a
  token per adapted linear) are left out: under 1% of a layer's at the ranks people use;
* the total against the GPU's memory less a reserve for the CUDA context, communication buffers
  and fragmentation, the tokens per step and, when it does not fit, the first changes (in order of
  what they cost) that make it fit.

The estimate is checked against the built model's parameter count (exact) and the activations
kept for backward measured on CPU (``tests/unit/test_plan.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field

from megatron_rpo.config import Config, ModelConfig, complete_model, explicit_keys, load_config
from megatron_rpo.errors import INPUT_ERROR_EXIT_CODE, InputError, report

__all__ = ["StagePlan", "Plan", "stage_parameters", "stage_adapters", "layer_activation_bytes", "plan", "main"]

GIB = 2**30
SHAPE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size")
"""The model keys a config must set for the plan to use its model rather than a checkpoint's."""
RESERVE_FRACTION = 0.10
"""Of the GPU's memory, kept for the CUDA context, NCCL buffers and allocator fragmentation."""


def _stage_layers(m: ModelConfig, pp: int, stage: int) -> list[int]:
    per = m.num_layers // pp
    return list(range(stage * per, (stage + 1) * per))


def stage_parameters(m: ModelConfig, tp: int = 1, pp: int = 1, stage: int = 0, ep: int = 1,
                     etp: int | None = None) -> dict[str, int]:
    """This rank's parameter count on pipeline ``stage``, by part (``dense`` and ``expert``).

    What megatron builds: column/row-parallel weights split by TP, norms whole, the router whole,
    ``num_moe_experts / EP`` experts each split by ETP, the (padded) embedding on the first
    stage, the final norm and the output layer on the last (a tied output weight is the
    embedding at PP 1 and a copy on the last stage otherwise).
    """
    etp = tp if etp is None else etp
    h, d = m.hidden_size, m.head_dim
    heads, qkv = m.num_attention_heads, m.qkv_width
    attention = h + qkv * h // tp + heads * d * h // tp + (qkv // tp if m.add_qkv_bias else 0) \
        + (2 * d if m.qk_layernorm else 0)
    dense_mlp = h + 3 * m.ffn_hidden_size * h // tp
    dense, expert = 0, 0
    moe = m.moe_layers
    for layer in _stage_layers(m, pp, stage):
        dense += attention
        if moe[layer]:
            width = m.moe_ffn_hidden_size or m.ffn_hidden_size
            dense += h + m.num_moe_experts * h  # pre-MLP norm, router
            expert += (m.num_moe_experts // ep) * 3 * width * h // etp
        else:
            dense += dense_mlp
    vocab = m.padded_vocab_size(tp) * h // tp
    if stage == 0:
        dense += vocab
    if stage == pp - 1:
        dense += h  # final norm
        if m.untie_embeddings_and_output_weights or pp > 1:
            dense += vocab
    return {"dense": dense, "expert": expert}


def stage_adapters(c: Config, stage: int = 0) -> dict[str, int]:
    """This rank's adapter parameters on pipeline ``stage`` (0 without ``lora``), by part (``dense``
    and ``expert``, as :func:`stage_parameters`): per adapted linear ``A`` (rank x in) and ``B``
    (out x rank), the TP-split side split (column layers: ``B``'s rows, row layers: ``A``'s
    columns); in a mixture-of-experts layer ``linear_fc1``/``linear_fc2`` are its ``num_moe_experts
    / EP`` experts' (split by ETP), and a dense MLP layer of such a model has none
    (:func:`megatron_rpo.models.lora.apply_lora`)."""
    m, lora, p = c.model, c.lora, c.parallel
    if not lora.enabled:
        return {"dense": 0, "expert": 0}
    tp, r = p.tensor_model_parallel_size, lora.rank
    h, d = m.hidden_size, m.head_dim
    width = m.moe_ffn_hidden_size or m.ffn_hidden_size

    def count(shapes, split):  # shapes: linear -> (in, out, column-parallel); the targets among them
        return sum(r * i + r * o // split if column else r * i // split + r * o
                   for i, o, column in (shapes[t] for t in lora.targets if t in shapes))

    attention = {"linear_qkv": (h, m.qkv_width, True), "linear_proj": (m.num_attention_heads * d, h, False)}
    mlp = {"linear_fc1": (h, 2 * m.ffn_hidden_size, True), "linear_fc2": (m.ffn_hidden_size, h, False)}
    experts = {"linear_fc1": (h, 2 * width, True), "linear_fc2": (width, h, False)}
    dense, expert = 0, 0
    moe = m.moe_layers
    for layer in _stage_layers(m, p.pipeline_model_parallel_size, stage):
        dense += count(attention, tp)
        if m.num_moe_experts is None:
            dense += count(mlp, tp)
        elif moe[layer]:
            expert += m.num_moe_experts // p.expert_model_parallel_size * count(experts, p.expert_tensor_size)
    return {"dense": dense, "expert": expert}


def layer_activation_bytes(m: ModelConfig, layer_is_moe: bool, tokens: int, tp: int, sp: bool, element: int,
                           etp: int | None = None, transformer_engine: bool = True, cp: int = 1) -> dict[str, float]:
    """Bytes one layer keeps for backward for ``tokens`` tokens (this CP rank's part), by part.

    The tensors our layers save (megatron's linear layers keep their input, under sequence
    parallelism the local shard; attention is flash-style, no [s, s] scores):

    * ``norms``: each of the two norms keeps its input and its output (the next linear's input),
      and on the local spec (no transformer-engine) also the normalised copy before the weight;
    * ``attention``: the fused QKV output (v is a view of it), q and k after RoPE (and their norms),
      the context (the projection's input); under context parallelism also the whole sequences'
      keys and values the rank's queries attend to (CP times its own);
    * ``mlp``: SwiGLU's input, its silu and its product (fc2's input); for experts the same per
      routed copy of a token (``moe_router_topk`` of them), with the permuted input and the output
      that is weighted by the router's probability.
    """
    etp = tp if etp is None else etp
    h, d = m.hidden_size, m.head_dim
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    seq_split = tp if sp else 1  # what only sequence parallelism splits over TP
    norms = 2 * (2 if transformer_engine else 3) * h / seq_split
    attention = (m.qkv_width + heads * d + groups * d + heads * d) / tp
    if m.qk_layernorm:
        attention += (heads + groups) * d * (1 if transformer_engine else 2) / tp
    if cp > 1:
        attention += 2 * groups * d * cp / tp
    if layer_is_moe:
        width = m.moe_ffn_hidden_size or m.ffn_hidden_size
        mlp = m.moe_router_topk * (2 * h + 4 * width / etp) / seq_split
    else:
        mlp = 4 * m.ffn_hidden_size / tp
    return {k: v * tokens * element for k, v in {"norms": norms, "attention": attention, "mlp": mlp}.items()}


def _stage_activation_bytes(c: Config, stage: int, tokens: int, element: int, transformer_engine: bool) -> float:
    """One microbatch's activations on ``stage`` under the recompute setting."""
    m, p = c.model, c.parallel
    tp, sp = p.tensor_model_parallel_size, p.sequence_parallel
    pp = p.pipeline_model_parallel_size
    layers = _stage_layers(m, pp, stage)
    per = [layer_activation_bytes(m, bool(m.moe_layers[i]), tokens, tp, sp, element, p.expert_tensor_size,
                                  transformer_engine, p.context_parallel_size) for i in layers]
    full = [sum(x.values()) for x in per]
    hidden = m.hidden_size * tokens * element / (tp if sp else 1)  # a layer's input
    # the last stage's final norm, as a layer's norm (the output layer's input is its output)
    tail = (2 if transformer_engine else 3) * hidden if stage == pp - 1 else 0.0
    if m.recompute_granularity == "full":
        n = m.recompute_num_layers
        if m.recompute_method == "uniform":
            # one input kept per group of n layers; in backward one group's activations come back
            groups = -(-len(layers) // n)
            return groups * hidden + max(sum(full[i:i + n]) for i in range(0, len(layers), n)) + tail
        # block: the first n layers keep only their input, the rest everything; one layer comes back
        return n * hidden + sum(full[n:]) + (max(full[:n]) if n else 0) + tail
    total = sum(full) + tail
    if m.recompute_granularity == "selective":
        modules = m.recompute_modules or ["core_attn"]
        for i, x in zip(layers, per):
            if "mlp" in modules and not m.moe_layers[i] or "moe" in modules and m.moe_layers[i]:
                total -= x["mlp"]  # the MLP keeps only its input, the norm's output
            # core_attn: flash attention keeps no scores, and q, k, v stay as its inputs: no change
    return total


@dataclass
class StagePlan:
    """Bytes per GPU on one pipeline stage, by part."""

    stage: int
    parameters: int
    expert_parameters: int
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.parts.values())


@dataclass
class Plan:
    """What :func:`plan` found: the stage that needs most, and the run's shape."""

    config: Config
    gpus: int
    gpu_memory: float
    data_parallel: int
    microbatches: int
    tokens_per_microbatch: int
    stages: list[StagePlan]

    @property
    def worst(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.total)

    @property
    def usable(self) -> float:
        return self.gpu_memory * (1 - RESERVE_FRACTION)

    @property
    def fits(self) -> bool:
        return self.worst.total <= self.usable

    @property
    def tokens_per_step(self) -> int:
        return self.tokens_per_microbatch * self.microbatches * self.data_parallel


def plan(c: Config, gpus: int, gpu_memory_gib: float, *, bf16: bool | None = None,
         transformer_engine: bool = True) -> Plan:
    """The per-GPU memory of ``c`` on ``gpus`` GPUs of ``gpu_memory_gib`` GiB (see the module doc).

    ``bf16``: weights and activations in bf16 (default: ``optimizer.bf16``, as on a GPU).
    ``transformer_engine``: the layers are transformer-engine's (GPU); False: the local spec (CPU).
    """
    m, p, o = c.model, c.parallel, c.optimizer
    transformer_engine = transformer_engine and not c.lora.enabled  # adapters go on the local layers
    tp, pp, ep = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_model_parallel_size
    dp = c.data_parallel_size(gpus)
    expert_dp = gpus // (ep * p.expert_tensor_size * pp)
    bf16 = o.bf16 if bf16 is None else bf16
    element = 2 if bf16 else 4
    rows = c.train.micro_batch_size * (2 if c.data.paired or c.loss.uses_mismatched else 1)  # KTO: + mismatched
    tokens = rows * c.data.max_length  # packed rows hold at most this many
    local = tokens // p.context_parallel_size  # what a CP rank holds of them
    microbatches = c.train.global_batch_size // (c.train.micro_batch_size * dp)
    # optimizer state per parameter: float32 master weights (only when they are not the weights)
    # and Adam's two moments (RMSprop is Adam with beta1 = 0: megatron keeps both)
    state = (4 if bf16 else 0) + 8
    vocab_shard = m.padded_vocab_size(tp) // tp
    stages = []
    for stage in range(pp):
        count = stage_parameters(m, tp, pp, stage, ep, p.expert_tensor_size)
        n = count["dense"] + count["expert"]
        lora = stage_adapters(c, stage)
        adapters = lora["dense"] + lora["expert"]
        # the distributed optimizer shards over data x context parallel ranks (megatron's)
        shards = (dp * p.context_parallel_size, expert_dp) if o.use_distributed_optimizer else (1, 1)
        if adapters:  # the base frozen: gradients and optimizer state for the adapters only
            parts = {"weights": n * element, "adapters": adapters * element, "gradients": adapters * 4,
                     "optimizer": lora["dense"] * state / shards[0] + lora["expert"] * state / shards[1]}
        else:
            parts = {
                "weights": n * element,
                "gradients": n * 4,  # megatron's DDP grad buffer, float32 (grad_reduce_in_fp32)
                "optimizer": count["dense"] * state / shards[0] + count["expert"] * state / shards[1],
            }
        if c.loss.uses_reference and c.loss.reference == "online" and not adapters:
            parts["reference weights"] = n * element  # with adapters, the base is the reference
        # megatron's warm-up: stage k runs pp - k - 1 forwards before its first backward (1F1B);
        # interleaved, (pp - k - 1) x 2 + (vpp - 1) x pp forwards of chunks of 1 / vpp of the stage.
        # Those and the current one are in flight, all of them when the step has fewer.
        vpp = p.virtual_pipeline_model_parallel_size or 1
        warmup = pp - stage - 1 if vpp == 1 else (pp - stage - 1) * 2 + (vpp - 1) * pp
        in_flight = min(warmup + 1, microbatches * vpp) / vpp
        parts["activations"] = in_flight * _stage_activation_bytes(c, stage, local, element, transformer_engine)
        if stage == pp - 1:
            chunk = min(m.logprob_chunk_tokens or local, local)
            # the float32 logits (the cross entropy works on them in place, and so does its
            # gradient) and, while they are made, the bf16 ones
            logits = chunk * vocab_shard * (4 + (element if element < 4 else 0))
            if m.logprob_chunk_tokens:
                # a chunk's output-weight gradient and the sum it is added to
                logits += 2 * vocab_shard * m.hidden_size * element
            parts["logits"] = logits
        stages.append(StagePlan(stage, n - count["expert"], count["expert"], parts))
    return Plan(c, gpus, gpu_memory_gib * GIB, dp, microbatches, tokens, stages)


def _remedies(c: Config) -> list[dict[str, object]]:
    """The changes tried, in order of what they cost; none changes what a step computes."""
    m = c.model
    steps: list[dict[str, object]] = []
    if not c.optimizer.use_distributed_optimizer:
        steps.append({"optimizer.use_distributed_optimizer": True})
    if m.logprob_chunk_tokens is None:
        steps.append({"model.logprob_chunk_tokens": 4096})
    if m.recompute_granularity is None:
        steps.append({"model.recompute_granularity": "selective",
                      "model.recompute_modules": ["core_attn", "mlp"] + (["moe"] if m.num_moe_experts else [])})
    if m.recompute_granularity != "full":
        steps.append({"model.recompute_granularity": "full", "model.recompute_method": "uniform",
                      "model.recompute_num_layers": 1, "model.recompute_modules": None})
    return steps


def _apply(c: Config, changes: dict[str, object]) -> Config:
    sections = {name: dataclasses.replace(getattr(c, name), **{k.split(".")[1]: v for k, v in changes.items()
                                                                 if k.startswith(name + ".")})
                for name in ("model", "optimizer")}
    return dataclasses.replace(c, **sections)


def first_fit(c: Config, gpus: int, gpu_memory_gib: float) -> dict[str, object] | None:
    """:func:`_remedies` taken in order, each kept if it lowers the stage that needs most (a later
    recompute setting replaces an earlier one), up to the first after which ``c`` fits; None when
    all of them do not make it fit."""
    applied: dict[str, object] = {}
    need = plan(c, gpus, gpu_memory_gib).worst.total
    for step in _remedies(c):
        tried = plan(_apply(c, {**applied, **step}), gpus, gpu_memory_gib)
        if tried.worst.total >= need:
            continue  # it saves nothing where memory is short (e.g. chunked logits on the first stage)
        applied.update(step)
        if tried.fits:
            return applied
        need = tried.worst.total
    return None


def _setting(value: object) -> str:
    """A value as it is written on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def _gib(x: float) -> str:
    return f"{x / GIB:7.2f} GiB"


def describe(result: Plan) -> str:
    """The plan as the command prints it."""
    c, w = result.config, result.worst
    m, p = c.model, c.parallel
    recompute = (m.recompute_granularity or "none") + (
        f" ({m.recompute_method}, {m.recompute_num_layers} layers)" if m.recompute_granularity == "full" else
        f" ({', '.join(m.recompute_modules or ['core_attn'])})" if m.recompute_granularity == "selective" else "")
    experts = (f" x EP {p.expert_model_parallel_size} (ETP {p.expert_tensor_size})" if m.num_moe_experts else "")
    lines = [
        f"{result.gpus} GPUs of {result.gpu_memory / GIB:g} GiB: TP {p.tensor_model_parallel_size} x PP "
        f"{p.pipeline_model_parallel_size}"
        + (f" (interleaved, VPP {p.virtual_pipeline_model_parallel_size})"
           if p.virtual_pipeline_model_parallel_size else "")
        + (f" x CP {p.context_parallel_size}" if p.context_parallel_size > 1 else "")
        + f" x DP {result.data_parallel}{experts}; "
        f"{'sequence parallel, ' if p.sequence_parallel else ''}recompute {recompute}, log-probs "
        f"{f'in chunks of {m.logprob_chunk_tokens} tokens' if m.logprob_chunk_tokens else 'whole'}, "
        f"{'distributed ' if c.optimizer.use_distributed_optimizer else ''}optimizer {c.optimizer.optimizer}"
        + (f", LoRA rank {c.lora.rank} on {', '.join(c.lora.targets)} (the rest frozen)" if c.lora.enabled else ""),
        f"tokens per step {result.tokens_per_step:,} ({result.microbatches} microbatches of "
        f"{result.tokens_per_microbatch:,} tokens per data-parallel rank; packed rows hold at most that"
        + (f"; each CP rank holds 1/{p.context_parallel_size} of them" if p.context_parallel_size > 1 else "") + ")",
        f"per GPU on pipeline stage {w.stage} (the most of {len(result.stages)}): "
        f"{w.parameters + w.expert_parameters:,} parameters"
        + (f" ({w.expert_parameters:,} of them experts)" if w.expert_parameters else ""),
    ]
    for name, value in w.parts.items():
        lines.append(f"  {name:<18} {_gib(value)}")
    lines.append(f"  {'total':<18} {_gib(w.total)}   of {_gib(result.usable).strip()} usable "
                 f"({result.gpu_memory / GIB:g} GiB less {RESERVE_FRACTION:.0%} reserve)")
    if result.fits:
        lines.append(f"verdict: fits ({w.total / result.usable:.0%} of the usable memory)")
    else:
        fix = first_fit(c, result.gpus, result.gpu_memory / GIB)
        lines.append(f"verdict: does not fit ({w.total / result.usable:.0%} of the usable memory); " + (
            "first changes that fit: " + " ".join(f"{k}={_setting(v)}" for k, v in fix.items() if v is not None)
            if fix else
            "no memory setting makes it fit: more GPUs (larger TP or PP), a smaller micro batch or shorter sequences"))
    return "\n".join(lines)


def resolve_model(c: Config, hf_dir: str | None = None) -> tuple[Config, str]:
    """``c`` with the architecture of the converted checkpoint ``train.load`` (its metadata) or,
    when that is not at hand, of the Hugging Face model ``hf_dir`` (its config.json), completed as
    training completes it (what the config sets wins; training refuses an architecture that
    disagrees). Without either, the config's model as written."""
    from megatron_rpo.convert.files import ConvertedCheckpoint
    from megatron_rpo.convert.hf_config import model_config_from_hf, read_hf_config

    if c.train.load and os.path.isdir(c.train.load):
        source, theirs = f"the model of {c.train.load}", ConvertedCheckpoint(c.train.load).model_config
    elif hf_dir:
        source = f"the model of {hf_dir}/config.json"
        theirs, _ = model_config_from_hf(read_hf_config(hf_dir), os.path.join(hf_dir, "config.json"))
    else:
        explicit = explicit_keys(c) or frozenset()
        missing = [k for k in SHAPE_KEYS if f"model.{k}" not in explicit]
        if len(missing) == len(SHAPE_KEYS):
            raise InputError(f"the config takes its model from train.load ({c.train.load}), which is not a converted "
                             "checkpoint here: convert it first, or pass --hf-config HF_DIR (its config.json)")
        return c, (f"the config's model (no checkpoint at {c.train.load})" + (
            f"; it leaves out {', '.join('model.' + k for k in missing)}: Llama-2-7B's values" if missing else ""))
    model = complete_model(c, theirs, source, has="it has")  # as training completes it
    return dataclasses.replace(c, model=model), source


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_rpo.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the recipe (YAML)")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs of the whole run")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80)")
    parser.add_argument("--hf-config", metavar="HF_DIR",
                        help="the Hugging Face model to take the architecture from when train.load is not converted "
                             "yet (only its config.json is read)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, as for training")
    a = parser.parse_args(argv)
    try:
        config = load_config(a.config, a.overrides)
        if a.gpus <= 0 or not 0 < a.gpu_memory_gib < float("inf"):  # nan and inf fail the comparison
            raise InputError(f"--gpus ({a.gpus}) and --gpu-memory-gib ({a.gpu_memory_gib}) must be > 0 (and finite)")
        config, source = resolve_model(config, a.hf_config)
        config.check_lengths()
        result = plan(config, a.gpus, a.gpu_memory_gib)
    except InputError as e:
        report(e)
        return INPUT_ERROR_EXIT_CODE
    print(f"memory plan for {a.config}, {source}")
    print(describe(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
