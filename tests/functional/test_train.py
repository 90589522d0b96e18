"""Short end-to-end training runs on 2 gloo processes: the trainer, resumption, export, errors."""

import json
import os
import re

import pytest
import torch

from tests.multiprocess import run_ranks
from tests.workspace import overrides as _overrides
from tests.workspace import train as _train
from tests.workspace import RECIPE, train_each


def test_resumed_run_matches_the_uninterrupted_one_bitwise(workspace, tmp_path):
    part = _overrides(workspace, tmp_path / "resumed", "train.save_interval=3")
    full, first, second = run_ranks(train_each, 2, [_overrides(workspace, tmp_path / "full", "train.save_interval=3"),
                                                   part + ["train.exit_interval=3"], part], timeout=600)[0]
    assert [h["step"] for h in full["history"]] == [1, 2, 3, 4, 5, 6]
    losses = [h["loss"] for h in full["history"]]
    assert all(l == l and l > 0 for l in losses)  # finite, positive
    assert full["history"][0]["matrix_rows"] == 8  # the matrix spans both ranks' 4 pairs
    assert [h["step"] for h in first["history"]] == [1, 2, 3]
    assert [h["step"] for h in second["history"]] == [4, 5, 6]
    for a, b in zip(first["history"] + second["history"], full["history"]):
        for key in ("loss", "chosen_reward", "rejected_reward", "grad_norm", "lr"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    assert second["eval"] == full["eval"]

    save = tmp_path / "full"
    assert (save / "latest").read_text().strip() == "iter_0000006"
    assert sorted(p.name for p in save.iterdir() if p.name.startswith("iter_")) == ["iter_0000003", "iter_0000006"]
    assert list((save / "tensorboard").glob("events.*"))
    assert (save / "config.yaml").exists()


def test_export_converts_to_hugging_face(workspace, tmp_path):
    from transformers import AutoModelForCausalLM

    from megatron_rpo.convert import convert_megatron_to_hf

    save = tmp_path / "run"
    run_ranks(_train, 2, _overrides(workspace, save, "train.train_iters=2", "loss.loss_type=sft"), timeout=600)
    convert_megatron_to_hf(str(save / "export"), str(tmp_path / "hf"), progress=False)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    start = AutoModelForCausalLM.from_pretrained(workspace["root"] / "hf").eval()
    tokens = torch.randint(0, workspace["vocab"], (1, 12))
    with torch.no_grad():
        a, b = trained(tokens).logits, start(tokens).logits
    assert torch.isfinite(a).all() and not torch.allclose(a, b)  # two SFT steps moved the weights


def test_bad_setups_fail_before_any_work(workspace, tmp_path, hh_slice):
    from megatron_rpo.data.preprocess import preprocess
    from megatron_rpo.data.tokenizer import train_sentencepiece

    other = train_sentencepiece([json.loads(line)["chosen"] for line in open(hh_slice)][:100],
                                str(tmp_path / "other"), vocab_size=600)
    preprocess([str(workspace["root"] / "valid.jsonl")], "hh", other, str(tmp_path / "valid"),
               max_prompt_length=96, max_length=160, progress=False)
    cases = [
        (["parallel.pipeline_model_parallel_size=4"],
         r"world size 2 is not divisible by .*pipeline_model_parallel_size \(4\)"),
        (["model.num_layers=2"], r"does not fit the config: model.num_layers=2 but the checkpoint has 4"),
        (["train.global_batch_size=6", "train.micro_batch_size=4"], r"global_batch_size \(6\) is not divisible"),
        ([f"data.valid_data_prefix={tmp_path / 'valid'}", "loss.weighting=uniform"],
         "were tokenised with different tokenizers"),
    ]
    results = run_ranks(train_each, 2, [_overrides(workspace, tmp_path / f"bad{i}", *extra)
                                        for i, (extra, _) in enumerate(cases)], timeout=300)[0]
    for i, ((_, message), result) in enumerate(zip(cases, results)):
        assert re.search(message, result.get("error", "")), (message, result)
        assert not (tmp_path / f"bad{i}").exists()


def _crash_during_save(overrides):
    from megatron.core import parallel_state

    from megatron_rpo.config import load_config
    from megatron_rpo.training import checkpointing
    from megatron_rpo.training.trainer import Trainer

    trainer = Trainer(load_config(RECIPE, overrides))
    trainer.train()  # saves iter_0000002
    real_save = checkpointing.dist_checkpointing.save

    def dies_halfway(state, directory, **kwargs):
        with open(os.path.join(directory, "partial.distcp"), "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError("disk full")

    checkpointing.dist_checkpointing.save = dies_halfway
    trainer.step = 3
    try:
        trainer.save()
    except OSError as e:
        crashed = str(e)
    finally:
        checkpointing.dist_checkpointing.save = real_save
        trainer.scalars.close()
        parallel_state.destroy_model_parallel()  # the process group stays for the next Trainer
    resumed = Trainer(load_config(RECIPE, overrides))  # must load the previous checkpoint
    resumed.scalars.close()
    return {"crashed": crashed, "resumed_step": resumed.step}


def test_a_crash_during_a_save_keeps_the_previous_checkpoint(workspace, tmp_path):
    save = tmp_path / "run"
    (result,) = run_ranks(_crash_during_save, 1, _overrides(workspace, save, "train.train_iters=2",
                                                           "train.export=false", "loss.weighting=uniform"),
                          timeout=300)
    assert result == {"crashed": "disk full", "resumed_step": 2}
    assert (save / "latest").read_text().strip() == "iter_0000002"
    assert (save / "iter_0000003.tmp" / "partial.distcp").exists() and not (save / "iter_0000003").exists()


def test_unpaired_runs_report_the_reward_auc(workspace, tmp_path):
    # 2 ranks x 2 items: the matrix can be 2 x 2 with four unrelated prompts; no diagonal accuracy then.
    result = run_ranks(_train, 2, _overrides(workspace, tmp_path / "run", "data.paired=false", "loss.tau=0.75",
                                             "train.micro_batch_size=2", "train.global_batch_size=4",
                                             "train.train_iters=2", "train.export=false"), timeout=300)[0]
    for h in result["history"]:
        assert h["accuracy"] != h["accuracy"] and 0.0 <= h["reward_auc"] <= 1.0  # NaN, and an AUC
    assert result["eval"]["accuracy"] == result["eval"]["accuracy"]  # the held-out set is paired data


def test_dashboard_names_and_a_picture_of_the_run(workspace, tmp_path):
    from megatron_rpo.plot import main as plot_main
    from megatron_rpo.plot import read_scalars

    save = tmp_path / "run"
    result = run_ranks(_train, 1, _overrides(workspace, save, "train.train_iters=3", "train.eval_interval=2",
                                             "train.export=false"), timeout=300)[0]
    scalars = read_scalars(str(save))
    last = result["history"][-1]
    # TRL's names for what users compare across tools, ours under contrast/.
    for tag, key in [("rewards/chosen", "chosen_reward"), ("rewards/rejected", "rejected_reward"),
                     ("rewards/margins", "reward_margin"), ("rewards/accuracies", "accuracy"),
                     ("logps/chosen", "chosen_logps"), ("logps/rejected", "rejected_logps"),
                     ("contrast/matrix_rows", "matrix_rows"), ("contrast/row_entropy", "row_entropy"),
                     ("contrast/reward_auc", "reward_auc")]:
        step, value = scalars[f"train/{tag}"][-1]
        assert step == 3 and value == pytest.approx(last[key], rel=1e-6), tag
    assert last["chosen_logps"] < 0
    assert [s for s, _ in scalars["eval/loss"]] == [2, 3] and "train/tflops" in scalars
    assert plot_main([str(save)]) == 0
    png = (save / "run.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def _wandb_history(run_file) -> dict[str, dict[int, float]]:
    """``{name: {step: value}}`` from an offline W&B run file (a LevelDB-style log of protobuf records)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, payloads, chunk = 7, [], b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # the rest of a block is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            payloads.append(payload)
        elif kind == 2:
            chunk = payload
        elif kind == 3:
            chunk += payload
        elif kind == 4:
            payloads.append(chunk + payload)
    history: dict[str, dict[int, float]] = {}
    for payload in payloads:
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):  # the config comes with the run record (and later updates)
            for item in (record.run.config if kind == "run" else record.config).update:
                history.setdefault("_config", {})[item.key] = json.loads(item.value_json)
        if record.WhichOneof("record_type") != "history":
            continue
        items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
        step = int(items.pop("_step"))
        for name, value in items.items():
            if not name.startswith("_"):
                history.setdefault(name, {})[step] = value
    return history


def test_weights_and_biases_offline_matches_tensorboard_and_a_resume_continues_the_run(workspace, tmp_path):
    from megatron_rpo.plot import read_scalars

    save = tmp_path / "run"
    argv = _overrides(workspace, save, "train.train_iters=4", "train.eval_interval=2", "train.export=false",
                      "train.wandb_project=rpo-tests", "train.wandb_mode=offline", "loss.weighting=uniform")
    run_ranks(_train, 2, argv + ["train.exit_interval=2"], timeout=300)
    run_id = (save / "wandb_run_id").read_text().strip()
    run_ranks(_train, 2, argv, timeout=300)  # resumes at step 2: the same W&B run
    assert (save / "wandb_run_id").read_text().strip() == run_id
    files = sorted((save / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2  # one per (re)start, both of the same run id
    logged: dict[str, dict[int, float]] = {}
    for f in files:
        for name, values in _wandb_history(f).items():
            logged.setdefault(name, {}).update(values)
    config = logged.pop("_config")
    # The resolved config.
    assert config["loss"]["weighting"] == "uniform" and config["train"]["wandb_mode"] == "offline"
    tensorboard = read_scalars(str(save))
    assert set(logged) == set(tensorboard)
    for name, values in tensorboard.items():
        assert logged[name] == pytest.approx(dict(values), rel=1e-6), name
    assert sorted(logged["train/loss"]) == [1, 2, 3, 4] and sorted(logged["eval/rewards/accuracies"]) == [2, 4]


def test_the_model_comes_from_the_checkpoint_and_the_record_states_what_ran(workspace, tmp_path):
    import yaml

    # A recipe with no model section: the converted checkpoint says what the model is.
    recipe = yaml.safe_load(open(RECIPE))
    ckpt_model = recipe.pop("model")
    recipe["optimizer"] = {"optimizer": "rmsprop", "lr": 5e-4}
    recipe["data"].pop("max_prompt_length")
    path = tmp_path / "no_model.yaml"
    path.write_text(yaml.safe_dump(recipe))
    save = tmp_path / "run"
    argv = [a for a in _overrides(workspace, save, "train.train_iters=1", "train.export=false")
            if not a.startswith("model.")]
    refusals = [("model.num_layers=2", "model.num_layers=2 but the checkpoint has 4"),
                ("data.max_prompt_length=50", "data.max_prompt_length=50 but .* was preprocessed with 96"),
                ("optimizer.adam_beta1=0.9", "adam_beta1=0.9 has no effect with optimizer=rmsprop"),
                ("optimizer.bf16=true", "optimizer.bf16=true needs a GPU")]
    result, *refused = run_ranks(train_each, 1, [(str(path), argv)] + [
        (str(path), argv + [extra, f"train.save={tmp_path / 'bad'}"]) for extra, _ in refusals], timeout=300)[0]
    assert len(result["history"]) == 1
    ran = yaml.safe_load((save / "config.yaml").read_text())
    assert {k: ran["model"][k] for k in ("num_layers", "hidden_size", "num_query_groups")} == {
        k: ckpt_model[k] for k in ("num_layers", "hidden_size", "num_query_groups")}
    assert ran["model"]["vocab_size"] == workspace["vocab"]
    # What took effect, not what the defaults say: RMSprop's beta1, fp32 on CPU, the dataset's prompt limit.
    assert ran["optimizer"]["adam_beta1"] == 0.0 and ran["optimizer"]["bf16"] is False
    assert ran["data"]["max_prompt_length"] == 96

    # A key that was set and disagrees is still a clear error; so are settings that would do nothing.
    for (_, message), outcome in zip(refusals, refused):
        assert re.search(message, outcome.get("error", "")), (message, outcome)


def _stopped_then_resumed(uninterrupted_argv, stopped_argvs, stops):
    """An uninterrupted run; then for each stop step, a run stopped (as by SIGTERM) after it, its
    resume, and the same command once more (with the scalars it found)."""
    from megatron_rpo.config import load_config
    from megatron_rpo.plot import read_scalars
    from megatron_rpo.training.checkpointing import latest_checkpoint, read_training_state
    from megatron_rpo.training.interrupts import Preempted
    from megatron_rpo.training.trainer import Trainer

    def run(overrides, stop=None):
        trainer = Trainer(load_config(RECIPE, overrides))
        if stop is not None:
            trainer.stops.poll = lambda device: "SIGTERM" if trainer.step == stop else None
        try:
            return {"eval": trainer.train(), "history": trainer.history}
        except Preempted:
            save = trainer.config.train.save
            return {"preempted": trainer.step, "pending": read_training_state(latest_checkpoint(save))["pending"]}
        finally:
            trainer.close(keep_process_group=True)

    out = [run(uninterrupted_argv)]
    for argv, stop in zip(stopped_argvs, stops):
        stopped, resumed = run(argv, stop), run(argv)
        before = read_scalars(load_config(RECIPE, argv).train.save)
        out.append((stopped, resumed, run(argv), before))
    return out


def test_what_a_stop_leaves_undone_after_its_checkpoint_is_done_on_resume(workspace, tmp_path):
    """A stop at an evaluation step leaves that evaluation, one at the last step the export and the
    final evaluation: the resume does them, once (starting the finished run again does nothing)."""
    from megatron_rpo.convert.files import ConvertedCheckpoint
    from megatron_rpo.plot import read_scalars

    common = ["train.train_iters=4", "train.eval_interval=2", "train.save_interval=2", "loss.weighting=uniform"]
    stops = [2, 4]
    full, *cases = run_ranks(_stopped_then_resumed, 1, _overrides(workspace, tmp_path / "full", *common),
                             [_overrides(workspace, tmp_path / f"stop{k}", *common) for k in stops], stops,
                             timeout=400)[0]
    expected = read_scalars(str(tmp_path / "full"))
    b = ConvertedCheckpoint(str(tmp_path / "full" / "export"))
    for stop, (stopped, resumed, again, before) in zip(stops, cases):
        save = tmp_path / f"stop{stop}"
        assert stopped == {"preempted": stop, "pending": ["export", "eval"] if stop == 4 else ["eval"]}
        assert resumed["eval"] == full["eval"]
        assert again == {"eval": {}, "history": []} and read_scalars(str(save)) == before  # once, not twice
        scalars = read_scalars(str(save))
        assert scalars["eval/loss"] == expected["eval/loss"] and [s for s, _ in scalars["eval/loss"]] == [2, 4]
        a = ConvertedCheckpoint(str(save / "export"))
        assert sorted(a.index) == sorted(b.index) and all(torch.equal(a.get(n), b.get(n)) for n in a.index)


def _kto_runs(ws, root):
    from tests.workspace import step_gradients

    kto = ["data.paired=false", "loss.loss_type=kto", "loss.reference=online", "train.micro_batch_size=2",
           "train.global_batch_size=4", "train.export=false"]
    (run,) = train_each([_overrides(ws, root / "kto", *kto, "train.train_iters=3", "loss.beta=0.5")])
    grads = [step_gradients(_overrides(ws, root / f"g{i}", *kto, f"loss.contrast_scope={scope}"))
             for i, scope in enumerate(("data_parallel", "local"))]
    return {"run": run, "grads": grads}


def test_kto_trains_on_unpaired_items_against_its_reference_point(workspace, tmp_path):
    out = run_ranks(_kto_runs, 2, workspace, tmp_path, timeout=600)[0]
    history = out["run"]["history"]
    # Step 1: the policy is the reference, every log-ratio and the reference point are 0, and each
    # item's loss is lambda (1 - sigmoid(0)) = 0.5.
    assert history[0]["loss"] == pytest.approx(0.5, abs=1e-6) and history[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    for h in history:
        assert h["kl"] >= 0.0 and h["matrix_rows"] + h["matrix_cols"] == 4  # 2 ranks x 2 items, pairs apart
        assert h["accuracy"] != h["accuracy"] and 0.0 <= h["reward_auc"] <= 1.0
    assert history[1]["loss"] != 0.5 and history[1]["chosen_reward"] != 0.0  # the first step moved the policy
    evaluation = out["run"]["eval"]  # the held-out set is paired: scored as items, with its accuracy
    assert evaluation["loss"] == evaluation["loss"] and 0.0 <= evaluation["accuracy"] <= 1.0
    # The items and their mismatched pairs cross ranks intact: one matrix over both ranks' items
    # gives the gradients of each rank's own at the first step (the reference point is 0 in both).
    a, b = out["grads"]
    assert a["loss"] == pytest.approx(0.5, abs=1e-6)
    for name in a["grads"]:
        torch.testing.assert_close(a["grads"][name], b["grads"][name], rtol=1e-5, atol=1e-7)


def test_a_lora_checkpoint_holds_the_adapters_and_resumes_only_on_its_base(workspace, tmp_path):
    """Issue 35: the frozen base is not in a training checkpoint (the adapters and their optimizer
    state are), which names the base by its conversion's id; a resume on another base is refused
    before any work, naming both."""
    import shutil

    from torch.distributed.checkpoint import FileSystemReader

    from megatron_rpo.convert.files import MARKER

    base = workspace["root"] / "ckpt"
    other = tmp_path / "other_base"  # the same weights, converted again: another checkpoint id
    shutil.copytree(base, other)
    meta = json.loads((other / MARKER).read_text())
    (other / MARKER).write_text(json.dumps(dict(meta, checkpoint_id="0" * 32)))
    save = tmp_path / "lora"
    argv = _overrides(workspace, save, "lora.rank=4", "train.train_iters=2")
    trained, refused = run_ranks(train_each, 1, [argv, argv + [
        "train.train_iters=3", f"train.load={other}", "train.allow_config_change=true"]], timeout=600)[0]
    assert "error" not in trained, trained
    state = json.loads((save / "iter_0000002" / "training_state.json").read_text())
    assert state["base"] == {"path": str(base), "checkpoint_id": meta["checkpoint_id"]}
    keys = list(FileSystemReader(str(save / "iter_0000002")).read_metadata().state_dict_metadata)
    assert any("lora_A" in k for k in keys) and any("lora_B" in k for k in keys)
    frozen = [k for k in keys if k.endswith(("linear_qkv.weight", "word_embeddings.weight", "layernorm.weight"))]
    assert not frozen, frozen[:5]
    assert "holds adapters trained on the base" in refused["error"], refused
    assert str(base) in refused["error"] and str(other) in refused["error"]
    assert (save / "latest").read_text().strip() == "iter_0000002"  # nothing written by the refused run
    assert (save / "adapter" / "adapter_config.json").exists() and (save / "export").is_dir()
