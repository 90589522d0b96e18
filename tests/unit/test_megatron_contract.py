"""What we borrow from megatron-core's insides is still there, with the signature we rely on.

Every private name ``megatron_rpo/cpu.py`` replaces, and every private or internal name the rest
of the package imports, calls, wraps or sets: an upgrade of megatron-core that removes or reshapes one
fails here, by name, instead of deep in a run. CI runs it at both ends of the supported range
(docs/versions.md).

Two kinds of entry:

* **replaced** (cpu.py puts its own function in megatron's place): ours must accept every
  parameter megatron's has, since megatron calls it;
* **used** (we call it or read it): megatron's must accept every parameter we pass.
"""

import importlib
import inspect

import pytest

# (module, name, parameters, who borrows it): the function ours stands in for, which must take
# no parameter beyond ``parameters``.
REPLACED = [
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state", ("device", "clone", "graph_safe"),
     "cpu.py: the RNG tracker's states on the CPU generator"),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state", ("new_state", "device", "graph_safe"),
     "cpu.py: the RNG tracker's states on the CPU generator"),
    ("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker.add", ("self", "name", "seed"),
     "cpu.py: seeding the CPU generator"),
    ("megatron.core.tensor_parallel.mappings", "_gather_along_first_dim",
     ("input_", "group", "output_split_sizes", "use_global_buffer"), "cpu.py: uneven gathers over gloo"),
    ("megatron.core.tensor_parallel.mappings", "_reduce_scatter_along_first_dim",
     ("input_", "group", "input_split_sizes", "use_global_buffer"), "cpu.py: uneven reduce-scatters over gloo"),
    ("megatron.core.transformer.moe.token_dispatcher", "MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize",
     ("self", "point", "tokens_per_expert"), "cpu.py: the dispatcher's host copies"),
    ("torch.autograd.function", "BackwardCFunction.apply", ("self", "args"),
     "cpu.py: the CUDA-to-CPU mode inside custom backwards"),
]
# (module, name, parameters we pass, who borrows it)
USED = [
    ("megatron.core.tensor_parallel.random", "initialize_rng_tracker", ("force_reset",), "cpu.py"),
    ("megatron.core.dist_checkpointing.strategies.torch", "_replace_state_dict_keys_with_sharded_keys",
     ("sharded_state_dict", "keep_only_main_replica"), "training/checkpointing.py: the in-process save"),
    ("megatron.core.dist_checkpointing.strategies.torch", "mcore_to_pyt_state_dict", ("state_dict", "is_loading"),
     "training/checkpointing.py: the in-process save"),
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreSavePlanner",
     ("dedup_replicated_tensors", "flatten_state_dict"), "training/checkpointing.py: the in-process save"),
    ("megatron.core.dist_checkpointing.strategies.torch", "TorchDistSaveShardedStrategy",
     ("backend", "version", "thread_count"), "training/checkpointing.py: the in-process save"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.sharded_state_dict",
     ("model_sharded_state_dict", "is_loading", "metadata"), "training/checkpointing.py"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.load_parameter_state_from_fully_reshardable",
     ("state_dict",), "training/checkpointing.py: the optimizer's state loaded apart"),
    ("megatron.core.optimizer_param_scheduler", "OptimizerParamScheduler.step", ("increment",),
     "training/checkpointing.py: the schedule at a resumed step"),
    ("megatron.core.models.gpt", "GPTModel._postprocess", ("hidden_states", "labels"),
     "models/provider.py: log-probs instead of the LM loss"),
    ("megatron.core.transformer.transformer_layer", "get_transformer_layer_offset", ("config", "vp_stage"),
     "models/provider.py"),
    ("megatron.core.transformer.transformer_block", "get_num_layers_to_build", ("config", "vp_stage"),
     "models/provider.py"),
    ("megatron.core.tensor_parallel.mappings", "gather_from_sequence_parallel_region",
     ("input_", "tensor_parallel_output_grad", "group"), "models/lora.py: a column adapter's A x under SP"),
    ("megatron.core.tensor_parallel.mappings", "reduce_scatter_to_sequence_parallel_region", ("input_", "group"),
     "models/lora.py: a row adapter's A x under SP"),
    ("megatron.core.tensor_parallel.mappings", "copy_to_tensor_model_parallel_region", ("input_", "group"),
     "models/lora.py: a column adapter's A x; an expert adapter's ETP-whole side"),
    ("megatron.core.tensor_parallel.mappings", "reduce_from_tensor_model_parallel_region", ("input_", "group"),
     "models/lora.py: a row adapter's A x"),
    ("megatron.core.transformer.utils", "make_sharded_tensors_for_checkpoint",
     ("state_dict", "prefix", "tensor_parallel_layers_axis_map", "sharded_offsets", "tp_group", "dp_cp_group"),
     "models/lora.py: an adapted layer's sharded state"),
    ("megatron.core.transformer.mlp", "apply_swiglu_sharded_factory",
     ("original_sh_ten", "sharded_offsets", "singleton_local_shards"),
     "models/lora.py: B of linear_fc1 in its weight's [gate; up] order"),
    ("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker.fork", ("self",),
     "models/lora.py: an adapter's dropout under SP"),
    ("megatron.core.utils", "get_attr_wrapped_model", ("model", "attr"),
     "training/forward_step.py: which layers the model has, through megatron's wrappers"),
    ("megatron.core.tensor_parallel", "ColumnParallelLinear.forward", ("input_",),
     "models/lora.py: the base layer's own forward, called by the adapted one"),
    ("megatron.core.tensor_parallel", "RowParallelLinear.forward", ("input_",),
     "models/lora.py: the base layer's own forward, called by the adapted one"),
]
# (module, class, attributes its code sets on ``self``, who reads or sets them)
ATTRIBUTES = [
    ("megatron.core.transformer.moe.token_dispatcher", "MoEAlltoAllTokenDispatcher",
     ("cuda_dtoh_point", "cuda_dtoh_stream", "drop_and_pad", "input_splits", "output_splits", "output_splits_tp"),
     "cpu.py: the dispatcher's host copies"),
    ("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker", ("seeds_", "states_"),
     "cpu.py: seeding the CPU generator"),
    ("megatron.core.optimizer_param_scheduler", "OptimizerParamScheduler", ("num_steps",),
     "training/checkpointing.py: the step count of a resumed schedule"),
    ("megatron.core.dist_checkpointing.strategies.torch", "TorchDistSaveShardedStrategy", ("keep_only_main_replica",),
     "training/checkpointing.py: the in-process save"),
    ("megatron.core.tensor_parallel", "ColumnParallelLinear", ("is_expert", "tp_group", "sequence_parallel"),
     "models/lora.py: which group an adapter splits over, and whether the token dispatcher communicates"),
    ("megatron.core.tensor_parallel", "RowParallelLinear", ("is_expert", "tp_group", "sequence_parallel"),
     "models/lora.py: which group an adapter splits over, and whether the token dispatcher communicates"),
]


def _find(module: str, name: str):
    """``module.name`` (``name`` may be dotted), or a sentence saying which part is gone."""
    obj = importlib.import_module(module)
    for part in name.split("."):
        if not hasattr(obj, part):
            return None, f"{module}.{name} is gone ({part!r} not found)"
        obj = getattr(obj, part)
    return obj, None


def _parameters(obj) -> set[str]:
    signature = inspect.signature(obj.__init__ if inspect.isclass(obj) else obj)
    names = {p.name for p in signature.parameters.values()}
    if inspect.isclass(obj):
        names.discard("self")
    return names


def _takes_any(obj) -> bool:
    """Whether ``obj`` takes ``**kwargs`` (any keyword goes through)."""
    signature = inspect.signature(obj.__init__ if inspect.isclass(obj) else obj)
    return any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())


def replaced_problem(module: str, name: str, ours: tuple, who: str) -> str | None:
    obj, gone = _find(module, name)
    if gone:
        return f"{gone}; {who}"
    extra = _parameters(obj) - set(ours)
    if extra:
        return f"{module}.{name} now takes {sorted(extra)}, which ours does not; {who}"
    return None


def used_problem(module: str, name: str, passed: tuple, who: str) -> str | None:
    obj, gone = _find(module, name)
    if gone:
        return f"{gone}; {who}"
    missing = set(passed) - _parameters(obj)
    if missing and not _takes_any(obj):
        return f"{module}.{name} no longer takes {sorted(missing)}; {who}"
    return None


def attribute_problem(module: str, cls: str, attributes: tuple, who: str) -> str | None:
    obj, gone = _find(module, cls)
    if gone:
        return f"{gone}; {who}"
    source = "".join(inspect.getsource(k) for k in inspect.getmro(obj) if k.__module__.startswith("megatron"))
    missing = [a for a in attributes if f"self.{a}" not in source]
    if missing:
        return f"{module}.{cls} no longer sets {missing}; {who}"
    return None


def _id(entry) -> str:
    return f"{entry[0].rsplit('.', 1)[-1]}.{entry[1]}"


@pytest.mark.parametrize("entry", REPLACED, ids=_id)
def test_what_cpu_py_replaces_takes_no_parameter_ours_does_not(entry):
    problem = replaced_problem(*entry)
    assert problem is None, problem


@pytest.mark.parametrize("entry", USED, ids=_id)
def test_what_we_call_takes_the_parameters_we_pass(entry):
    problem = used_problem(*entry)
    assert problem is None, problem


@pytest.mark.parametrize("entry", ATTRIBUTES, ids=_id)
def test_the_attributes_we_read_are_still_set(entry):
    problem = attribute_problem(*entry)
    assert problem is None, problem


def test_cpu_py_replaces_only_the_names_listed_here():
    """A new replacement in cpu.py has to be listed above (the names it assigns, read off its source)."""
    import re

    from megatron_rpo import cpu

    patched = set(re.findall(r"^\s+(?:mrandom|mappings|moe_utils|token_dispatcher\.\w+|BackwardCFunction)\.(\w+) = ",
                             inspect.getsource(cpu), flags=re.M))
    listed = {name.rsplit(".", 1)[-1] for _, name, *_ in REPLACED}
    elsewhere = {"CudaRNGStatesTracker",  # a subclass of it: its add is in REPLACED, what it sets in ATTRIBUTES
                 "cuda_dtoh_stream",      # an attribute: in ATTRIBUTES
                 "te_general_gemm"}       # set only where megatron-core lacks it
    assert patched >= {"_gather_along_first_dim", "apply"}, "the pattern no longer reads cpu.py"
    unlisted = sorted(patched - listed - elsewhere)
    assert not unlisted, f"cpu.py replaces {unlisted}: add them to REPLACED"


def test_a_removed_name_fails_by_name(monkeypatch):
    """The check itself: with one borrowed name taken away, the failure names it and its user."""
    from megatron.core.tensor_parallel import mappings

    monkeypatch.delattr(mappings, "_gather_along_first_dim")
    problem = replaced_problem(*REPLACED[3])
    assert problem == ("megatron.core.tensor_parallel.mappings._gather_along_first_dim is gone "
                       "('_gather_along_first_dim' not found); cpu.py: uneven gathers over gloo")

    def narrower(input_, group):
        return input_

    monkeypatch.setattr(mappings, "_reduce_scatter_along_first_dim", narrower)
    assert "no longer takes ['input_split_sizes', 'use_global_buffer']" in used_problem(
        "megatron.core.tensor_parallel.mappings", "_reduce_scatter_along_first_dim",
        ("input_", "group", "input_split_sizes", "use_global_buffer"), "cpu.py")
