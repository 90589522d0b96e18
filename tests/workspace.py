"""A converted tiny Llama, train/valid datasets with embeddings, one-call trainer runs, and a
launched training command watched line by line.

Shared by the functional tests, the device-boundary test and the GPU tier (the fixture that
builds it is ``workspace`` in tests/conftest.py).
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "configs", "tiny_cpu.yaml")
HH_SLICE = os.path.join(REPO, "data", "hh_harmless_slice.jsonl")
"""The bundled 243-pair HH-RLHF slice (data/README.md)."""


def load_script(relative_path: str, name: str):
    """A script of the repository (tools/, examples/, bench/), imported as module ``name``.

    Registered in ``sys.modules``: dataclasses look their module up there.
    """
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, relative_path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build(root, hh_slice: str, sp_tokenizer: str) -> dict:
    """Write the checkpoint (``ckpt``, and Hugging Face ``hf``) and the ``train``/``valid`` datasets under ``root``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_rpo.config import load_config
    from megatron_rpo.convert import convert_hf_to_megatron
    from megatron_rpo.data.embeddings import precompute_prompt_embeddings
    from megatron_rpo.data.preprocess import preprocess
    from megatron_rpo.data.tokenizer import load_tokenizer

    vocab = load_tokenizer(sp_tokenizer).vocab_size
    m = load_config(RECIPE).model
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
                                 num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                                 num_key_value_heads=m.num_query_groups, max_position_embeddings=m.max_position_embeddings,
                                 rms_norm_eps=m.norm_epsilon)).save_pretrained(root / "hf")
    convert_hf_to_megatron(str(root / "hf"), str(root / "ckpt"), progress=False)
    with open(hh_slice) as f:
        lines = f.readlines()
    (root / "train.jsonl").write_text("".join(lines[:200]))
    (root / "valid.jsonl").write_text("".join(lines[200:232]))
    for split in ("train", "valid"):
        preprocess([str(root / f"{split}.jsonl")], "hh", sp_tokenizer, str(root / split), max_prompt_length=96,
                   max_length=160, progress=False)
        precompute_prompt_embeddings(str(root / split), progress=False)
    return {"root": root, "vocab": vocab}


def tiny_causal_lm(folder, sp_tokenizer: str) -> str:
    """A tiny random Llama with the sentencepiece tokenizer beside it, as an export is laid out."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_rpo.data.tokenizer import load_tokenizer

    tok = load_tokenizer(sp_tokenizer)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    shutil.copy(sp_tokenizer, os.path.join(folder, "tokenizer.model"))
    return str(folder)


def tiny_reward_model(folder) -> str:
    """A tiny random reward model (one score) with the bundled embedding model's WordPiece tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from megatron_rpo.data.embeddings import resolve_model

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=0)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_model("all-MiniLM-L6-v2")).save_pretrained(folder)
    return str(folder)


def hf_family_model(kind: str, **sizes):
    """A tiny random Hugging Face model of ``kind`` with the shape ``sizes`` (vocab_size, hidden_size,
    intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads, ...): Qwen3 with
    head_dim 1.5 x hidden / heads and tied embeddings; Qwen3-MoE (4 experts, top 2, expert width
    hidden / 2) with ``norm_topk_prob`` false (or true: ``qwen3_moe_norm``) and layer 1 dense; Mixtral
    (4 experts, top 2)."""
    from transformers import (
        MixtralConfig,
        MixtralForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    head = sizes["hidden_size"] // sizes["num_attention_heads"]
    if kind == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**sizes, head_dim=head * 3 // 2, tie_word_embeddings=True))
    if kind.startswith("qwen3_moe"):
        return Qwen3MoeForCausalLM(Qwen3MoeConfig(
            **sizes, head_dim=head, num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=sizes["hidden_size"] // 2,
            norm_topk_prob=kind.endswith("_norm"), mlp_only_layers=[1], router_aux_loss_coef=0.01))
    return MixtralForCausalLM(MixtralConfig(**sizes, num_local_experts=4, num_experts_per_tok=2, sliding_window=None))


def family_checkpoint(root, kind: str, vocab: int, tokenizer: str) -> str:
    """A tiny random ``kind`` (:func:`hf_family_model`) with configs/tiny_cpu.yaml's shape and
    ``tokenizer``, converted at ``root/<kind>/ckpt``; returns that path."""
    import shutil

    from megatron_rpo.config import load_config
    from megatron_rpo.convert import convert_hf_to_megatron

    m = load_config(RECIPE).model
    torch.manual_seed(0)
    model = hf_family_model(kind, vocab_size=vocab, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
                            num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                            num_key_value_heads=m.num_query_groups, max_position_embeddings=m.max_position_embeddings,
                            rms_norm_eps=m.norm_epsilon)
    model.save_pretrained(root / kind / "hf")
    shutil.copy(tokenizer, root / kind / "hf" / "tokenizer.model")
    convert_hf_to_megatron(str(root / kind / "hf"), str(root / kind / "ckpt"), progress=False)
    return str(root / kind / "ckpt")


def overrides(ws: dict, save, *extra: str) -> list[str]:
    """Command-line overrides of configs/tiny_cpu.yaml for a 6-step run on the workspace."""
    root = ws["root"]
    return [f"model.vocab_size={ws['vocab']}", f"train.load={root / 'ckpt'}",
            f"data.train_data_prefix={root / 'train'}", f"data.valid_data_prefix={root / 'valid'}",
            f"train.save={save}", "train.train_iters=6", "train.eval_iters=2", "train.keep_last=5", *extra]


def reference_tool(ckpt: str | None, prefix: str, *flags: str):
    """Run tools/precompute_reference_logps.py in these processes (its parallel state torn down
    after, the process group kept for the next case); returns the ``PREFIX.ref`` it wrote.
    ``ckpt`` None: the flags name it (``--config RECIPE``)."""
    from megatron.core import parallel_state as ps

    import megatron_rpo.parallel as parallel
    from megatron_rpo.data.dataset import PreferenceDataset

    tool = load_script("tools/precompute_reference_logps.py", "reference_tool")
    destroy, parallel.destroy = parallel.destroy, ps.destroy_model_parallel
    try:
        assert tool.main([*(["--load", ckpt] if ckpt else []), "--data-prefix", prefix, "--no-progress", *flags]) == 0
    finally:
        parallel.destroy = destroy
    return PreferenceDataset(prefix, reference_logps=True).ref_logps.copy()


def step_gradients(argv: list[str]) -> dict:
    """One training step of configs/tiny_cpu.yaml with ``argv``: this rank's whole gradients by
    checkpoint name (experts gathered over EP; a pipeline rank has its stage's), and the loss report."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_rpo.config import load_config
    from megatron_rpo.convert.layout import is_expert
    from megatron_rpo.convert.load import canonical_name
    from megatron_rpo.training.trainer import Trainer

    trainer = Trainer(load_config(RECIPE, argv))
    try:
        batches, _ = trainer.microbatches(trainer.train_data, iter(trainer.sampler), trainer.num_microbatches)
        reports = trainer.forward_backward_step(batches)
        grads = {}
        for module in trainer.module:
            for local, param in module.named_parameters():
                name = canonical_name(module, local)
                grad = param.main_grad.detach().clone()
                if is_expert(name):  # each EP rank holds other experts: every rank gets all of them
                    group = ps.get_expert_model_parallel_group()
                    names = [None] * dist.get_world_size(group)
                    dist.all_gather_object(names, name, group=group)
                    pieces = [torch.empty_like(grad) for _ in names]
                    dist.all_gather(pieces, grad, group=group)
                    grads.update(zip(names, pieces))
                else:
                    grads[name] = grad
        report = reports[0] if reports else {}
        return {"grads": grads, "loss": float(report["loss"]) if report else None,
                "chunks": [[layer.layer_number for layer in m.decoder.layers] for m in trainer.module],
                "matrix": (report["matrix_rows"], report["matrix_cols"]) if report else None}
    finally:
        trainer.close(keep_process_group=True)


def train_each(runs: list[list[str] | tuple[str, list[str]]]) -> list[dict]:
    """Several runs one after another in these processes, sharing their start-up: each is a list of
    overrides of configs/tiny_cpu.yaml, or ``(recipe, overrides)``. Returns per run its history and
    last evaluation, or ``{"error": message}`` for a run refused with a ValueError."""
    from megatron.core import parallel_state

    from megatron_rpo.config import load_config
    from megatron_rpo.training.trainer import Trainer

    out = []
    for run in runs:
        recipe, argv = run if isinstance(run, tuple) else (RECIPE, run)
        trainer = None
        try:
            trainer = Trainer(load_config(recipe, argv))
            evaluation = trainer.train()
            out.append({"history": trainer.history, "eval": evaluation})
        except ValueError as e:
            out.append({"error": str(e)})
        finally:
            if trainer is not None:
                trainer.close(keep_process_group=True)  # the process group stays for the next run
            else:
                parallel_state.destroy_model_parallel()
    return out


def train(overrides: list[str]) -> dict:
    """Train configs/tiny_cpu.yaml with ``overrides``; the per-step history and the last evaluation."""
    from megatron_rpo.config import load_config
    from megatron_rpo.training.trainer import Trainer

    trainer = Trainer(load_config(RECIPE, overrides))
    try:
        evaluation = trainer.train()
        return {"history": trainer.history, "eval": evaluation}
    finally:
        trainer.scalars.close()


class Job:
    """A training command in its own process group, its output collected line by line."""

    def __init__(self, argv: list[str], env: dict | None = None):
        self.lines: list[str] = []
        self.proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = re.search(pattern, line)
                if match:
                    return match
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.kill()
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n{self.output()[-4000:]}")

    def output(self) -> str:
        return "".join(self.lines)

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def launch_env() -> dict:
    """The environment of a launched training command: no rank variables of ours, one thread per process."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    return dict(env, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
