import dataclasses

import pytest
import yaml

from megatron_rpo.config import Config, LossConfig, ParallelConfig, config_to_dict, dump_config, load_config
from megatron_rpo.errors import InputError


def _write(path, data):
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


def test_defaults_are_the_papers():
    c = Config()
    assert (c.loss.beta, c.loss.tau, c.loss.weighting, c.loss.row_normalization) == (0.1, 0.5, "embedding", "sum")
    assert (c.optimizer.optimizer, c.optimizer.lr, c.train.global_batch_size) == ("rmsprop", 5e-7, 64)
    assert (c.data.max_prompt_length, c.data.max_length) == (None, 512)  # prompts are cut at preprocessing


def test_every_field_has_a_docstring():
    import ast
    import inspect

    from megatron_rpo import config as module

    tree = ast.parse(inspect.getsource(module))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name.endswith("Config"):
            body = node.body
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.AnnAssign):
                    nxt = body[i + 1] if i + 1 < len(body) else None
                    assert isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant), (
                        f"{node.name}.{stmt.target.id} has no docstring"
                    )


def test_yaml_with_defaults_and_overrides(tmp_path):
    _write(tmp_path / "base.yaml", {"model": {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4},
                                           "loss": {"beta": 0.5}})
    top = _write(tmp_path / "top.yaml", {"defaults": "base.yaml", "model": {"num_layers": 2}, "loss": {"tau": 0.75}})
    c = load_config(top, ["loss.beta=0.2", "parallel.tensor_model_parallel_size=2", "data.paired=false",
                          "train.train_iters=null"])
    assert c.model.num_layers == 2 and c.model.hidden_size == 64  # section merged key by key
    assert (c.loss.beta, c.loss.tau) == (0.2, 0.75)
    assert c.parallel.tensor_model_parallel_size == 2
    assert c.data.paired is False and c.train.train_iters is None


def test_int_is_accepted_for_float_fields(tmp_path):
    c = load_config(None, ["loss.beta=1"])
    assert c.loss.beta == 1.0 and isinstance(c.loss.beta, float)


def test_exponent_without_dot_is_a_float(tmp_path):
    # PyYAML reads 5e-7 as a string; a learning rate written that way must still work.
    path = _write(tmp_path / "lr.yaml", "optimizer:\n  lr: 5e-7\n")
    assert load_config(path, ["optimizer.min_lr=1e-8"]).optimizer.lr == 5e-7


def test_dump_and_load_round_trip(tmp_path):
    c = load_config(None, ["loss.loss_type=simpo_rpo", "loss.beta=2.5", "data.paired=false", "loss.tau=0.75",
                           "model.num_query_groups=8", "train.save=/tmp/x"])
    path = str(tmp_path / "resolved.yaml")
    dump_config(c, path)
    again = load_config(path)
    assert again == c
    assert config_to_dict(again) == config_to_dict(c)
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.parametrize("overrides,message", [
    (["loss.betta=0.2"], r"unknown key loss.betta"),
    (["losses.beta=0.2"], r"unknown section 'losses'"),
    (["loss.beta=high"], r"loss.beta must be a number, got 'high'"),
    (["loss.beta=true"], r"loss.beta must be a number, got True"),
    (["train.micro_batch_size=2.5"], r"train.micro_batch_size must be an integer, got 2.5"),
    (["data.paired=maybe"], r"data.paired must be a bool, got 'maybe'"),
    (["loss.weighting=cosine"], r"loss.weighting must be one of \['embedding', 'uniform', 'diagonal'\], got 'cosine'"),
    (["loss.tau=0"], r"loss.tau must be > 0, got 0.0"),
    (["loss.tau=-1"], r"loss.tau must be > 0, got -1.0"),
    (["loss.alpha=1.2"], r"loss.alpha must be in \[0, 1\], got 1.2"),
    (["loss.alpha=-0.1"], r"loss.alpha must be in \[0, 1\], got -0.1"),
    (["loss.weighting=diagonal", "data.paired=false"], r"weighting='diagonal' needs paired data.*data.paired=False"),
    (["loss.loss_type=dpo", "data.paired=false"], r"loss_type='dpo'.*needs data.paired=True"),
    (["loss.loss_type=dpo", "loss.contrast_scope=global_batch"], r"global_batch.*loss_type='dpo'"),
    (["loss.loss_type=kto"], r"loss_type='kto' trains on items.*set data.paired=false"),
    (["loss.loss_type=kto", "data.paired=false"], r"loss_type='kto' needs loss.reference='online'"),
    (["loss.loss_type=kto", "data.paired=false", "loss.reference=online", "loss.contrast_scope=global_batch"],
     r"global_batch.*loss_type='kto'"),
    (["loss.kto_undesirable_weight=0"], r"loss.kto_undesirable_weight must be > 0, got 0.0"),
    (["parallel.context_parallel_size=2", "data.packing=false"], r"context_parallel_size=2 cuts packed rows only"),
    (["parallel.context_parallel_size=4", "data.pack_multiple=4"], r"data.pack_multiple \(4\) must be a multiple "
                                                                    r"of 8 with context parallelism"),
    (["parallel.sequence_parallel=true"], r"sequence_parallel=True needs.*tensor_model_parallel_size > 1, got 1"),
    (["parallel.tensor_model_parallel_size=3"], r"num_attention_heads \(32\) is not divisible by.*\(3\)"),
    (["parallel.pipeline_model_parallel_size=5"], r"num_layers \(32\) is not divisible by.*\(5\)"),
    (["train.global_batch_size=10", "train.micro_batch_size=4"], r"global_batch_size \(10\).*micro_batch_size \(4\)"),
    (["data.max_prompt_length=512"], r"max_prompt_length \(512\) must be less than data.max_length \(512\)"),
    (["optimizer.min_lr=1", "optimizer.lr=0.1"], r"min_lr \(1.0\) exceeds optimizer.lr \(0.1\)"),
    (["beta=0.2"], r"must look like section.key=value"),
    (["loss.beta"], r"must look like section.key=value"),
])
def test_bad_values_name_key_and_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_file_errors_name_the_file(tmp_path):
    bad = _write(tmp_path / "bad.yaml", {"loss": {"tau": -2}})
    with pytest.raises(ValueError, match=r"bad.yaml: loss.tau must be > 0, got -2"):
        load_config(bad)
    unknown = _write(tmp_path / "unknown.yaml", {"loss": {"temperature": 1}})
    with pytest.raises(ValueError, match=r"unknown.yaml: unknown key loss.temperature"):
        load_config(unknown)
    broken = _write(tmp_path / "broken.yaml", "loss: [beta: 1\n")
    with pytest.raises(ValueError, match=r"broken.yaml: invalid YAML"):
        load_config(broken)
    with pytest.raises(ValueError, match=r"cannot read config .*missing.yaml"):
        load_config(str(tmp_path / "missing.yaml"))


def test_only_one_level_of_defaults(tmp_path):
    _write(tmp_path / "a.yaml", {"loss": {"beta": 0.3}})
    _write(tmp_path / "b.yaml", {"defaults": "a.yaml"})
    c = _write(tmp_path / "c.yaml", {"defaults": "b.yaml"})
    with pytest.raises(ValueError, match=r"c.yaml: its defaults file .*b.yaml has defaults of its own"):
        load_config(c)


def test_world_size_must_factor():
    c = load_config(None, ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2",
                           "train.global_batch_size=8", "train.micro_batch_size=2"])
    assert c.data_parallel_size(8) == 2
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by parallel.tensor_model_parallel_size "
                                         r"\(2\) x parallel.pipeline_model_parallel_size \(2\)"):
        c.data_parallel_size(6)
    with pytest.raises(ValueError, match=r"global_batch_size \(8\) is not divisible by .*\(2\) x data-parallel "
                                         r"size \(6\)"):
        c.data_parallel_size(24)


def test_sections_validate_when_built_directly():
    with pytest.raises(ValueError, match="loss.beta must be > 0"):
        LossConfig(beta=0)
    with pytest.raises(ValueError, match="parallel.tensor_model_parallel_size must be an integer"):
        ParallelConfig(tensor_model_parallel_size="2")
    assert dataclasses.replace(LossConfig(), beta=0.3).beta == 0.3


def test_loss_forms_that_would_do_nothing_are_refused():
    from megatron_rpo.config import LossConfig

    with pytest.raises(ValueError, match=r"diagonal_form='released' is a form of the diagonal weighting.*"
                                         r"loss.weighting='embedding'"):
        LossConfig(diagonal_form="released")
    with pytest.raises(ValueError, match=r"ipo_length_normalized=True only changes loss.loss_type='ipo', got 'rpo'"):
        LossConfig(ipo_length_normalized=True)
    LossConfig(weighting="diagonal", diagonal_form="released")
    LossConfig(loss_type="ipo", ipo_length_normalized=True)


MOE = ["model.num_layers=4", "model.num_moe_experts=8", "model.moe_router_topk=2", "model.moe_ffn_hidden_size=64"]


@pytest.mark.parametrize("overrides,message", [
    (MOE + ["parallel.expert_model_parallel_size=3"],
     r"model.num_moe_experts \(8\) is not divisible by parallel.expert_model_parallel_size \(3\)"),
    (MOE + ["parallel.tensor_model_parallel_size=2"],
     r"tensor_model_parallel_size=2 with a mixture-of-experts model needs parallel.sequence_parallel=true"),
    (MOE + ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
            "parallel.expert_tensor_parallel_size=3"],
     r"the experts' width \(64, model.moe_ffn_hidden_size\) is not divisible by "
     r"parallel.expert_tensor_parallel_size \(3\)"),
    (MOE + ["model.moe_router_topk=9"], r"model.moe_router_topk \(9\) exceeds model.num_moe_experts \(8\)"),
    (MOE + ["model.moe_router_topk=1"], r"model.moe_router_topk=1 needs model.moe_router_pre_softmax=true"),
    (MOE + ["model.moe_layer_freq=[1,0,1]"], r"model.moe_layer_freq lists 3 layers but model.num_layers is 4"),
    (MOE + ["model.moe_layer_freq=[1,0,2,1]"], r"must hold 0 \(dense\) or 1 \(experts\) per layer"),
    (["model.moe_layer_freq=2"], r"model.moe_layer_freq=2 needs model.num_moe_experts"),
    (MOE + ["parallel.expert_model_parallel_size=0"], r"parallel.expert_model_parallel_size must be > 0"),
])
def test_expert_layouts_are_checked_with_megatrons_rules(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_expert_parallel_world_must_factor():
    c = load_config(None, MOE + ["parallel.expert_model_parallel_size=4", "parallel.pipeline_model_parallel_size=2",
                                 "train.global_batch_size=8", "train.micro_batch_size=1"])
    assert c.data_parallel_size(8) == 4
    with pytest.raises(ValueError, match=r"world size 12 is not divisible by parallel.expert_model_parallel_size \(4\) "
                                         r"x "
                                         r"parallel.expert_tensor_parallel_size \(1\) x "
                                         r"parallel.pipeline_model_parallel_size \(2\)"):
        c.data_parallel_size(12)
    assert c.model.moe_layers == [1, 1, 1, 1]
    assert load_config(None, MOE + ["model.moe_layer_freq=2"]).model.moe_layers == [1, 0, 1, 0]


def test_expert_parallelism_on_a_dense_model_is_refused_when_the_model_is_known():
    from megatron_rpo.models import transformer_config

    c = load_config(None, ["parallel.expert_model_parallel_size=2"])  # the model may still come from a checkpoint
    with pytest.raises(ValueError, match=r"expert_model_parallel_size=2 .* need a mixture-of-experts model, and this "
                                         r"one is dense"):
        transformer_config(c.model, c.parallel)


def test_sequence_length_is_checked_against_the_model_that_runs():
    """A recipe whose model comes from its checkpoint may train longer sequences than the default
    model's 4096 positions; the check runs once the model is known (the trainer, the plan, the
    reference tool call ``check_lengths``)."""
    from megatron_rpo.config import load_config

    long = load_config(None, ["data.max_length=16384", "data.max_prompt_length=1024"])
    with pytest.raises(ValueError, match=r"data.max_length \(16384\) exceeds model.max_position_embeddings \(4096\)"):
        long.check_lengths()
    load_config(None, ["data.max_length=16384", "data.max_prompt_length=1024",
                       "model.max_position_embeddings=131072"]).check_lengths()


@pytest.mark.parametrize("override,message", [
    ("lora.rank=0", "lora.rank must be > 0, got 0"),
    ("lora.dropout=1.0", r"lora.dropout must be in \[0, 1\), got 1.0"),
    ("lora.targets=[q_proj]",
     r"lora.targets \['q_proj'\] must name at least one of \['linear_qkv'.*'q_proj'\] is not one"),
    ("lora.targets=[]", r"lora.targets \[\] must name at least one of"),
])
def test_bad_adapter_settings_are_refused_by_name(override, message):
    with pytest.raises(InputError, match=message):
        load_config(None, [override])


def test_adapters_are_off_unless_a_rank_is_given():
    assert not load_config(None).lora.enabled
    lora = load_config(None, ["lora.rank=8", "lora.alpha=16"]).lora
    assert lora.enabled and lora.scale == 2.0 and lora.targets == ["linear_qkv", "linear_proj", "linear_fc1",
                                                                      "linear_fc2"]


MOE_MODEL = ["model.num_moe_experts=4", "model.moe_ffn_hidden_size=64", "lora.rank=4"]


@pytest.mark.parametrize("overrides,message", [
    (["lora.dropout=0.1"], r"lora.dropout=0.1 cannot go on the experts .* Set lora.dropout=0, or leave the experts "
                           r"out of lora.targets"),
    (["parallel.tensor_model_parallel_size=4", "parallel.sequence_parallel=true",
      "parallel.expert_tensor_parallel_size=2"],
     r"parallel.expert_tensor_parallel_size=2 with adapters on the experts must be 1 or "
     r"parallel.tensor_model_parallel_size \(4\)"),
])
def test_adapters_on_experts_refuse_what_they_cannot_do(overrides, message):
    with pytest.raises(InputError, match=message):
        load_config(None, MOE_MODEL + overrides)
    # without the experts among the targets, or on a dense model, the same settings are fine
    load_config(None, MOE_MODEL + overrides + ["lora.targets=[linear_qkv,linear_proj]"])
    load_config(None, [o for o in MOE_MODEL if "moe" not in o] + overrides)
