"""Resolve, then run: the config completed against the checkpoint and the datasets, and every
input checked against the others, before any model is built. Plain functions of the config and
the datasets (no process group), called by the trainer; the memory plan completes its model with
the same :func:`megatron_rpo.config.complete_model`, so each rule is written once."""

from __future__ import annotations

import dataclasses
import os

import torch

from megatron_rpo.config import Config, ModelConfig, complete_model, explicit_keys
from megatron_rpo.convert.files import ConvertedCheckpoint
from megatron_rpo.data.dataset import PreferenceDataset
from megatron_rpo.data.files import manifest_path, read_manifest
from megatron_rpo.data.reference_logps import REFERENCE_KIND, reference_prefix
from megatron_rpo.data.tokenizer import check_tokenized_for
from megatron_rpo.errors import InputError

__all__ = ["resolve", "check_inputs"]


def resolve(c: Config, ckpt_model: ModelConfig, train_data: PreferenceDataset) -> Config:
    """The config that runs, every value as it takes effect (it is what ``config.yaml`` records).

    * ``model`` comes from the checkpoint, except keys the recipe or command line set, which
      must agree with it;
    * ``data.max_prompt_length`` is the training set's (prompts are cut at preprocessing); a
      value that was set must agree;
    * ``optimizer.adam_beta1`` is 0 under ``rmsprop``, ``optimizer.bf16`` false without a GPU;
      a contradicting value that was set is refused.
    """
    said = explicit_keys(c) or frozenset()  # refusals need a key the user actually wrote
    model = complete_model(c, ckpt_model, c.train.load)
    prompt = train_data.manifest["max_prompt_length"]
    if c.data.max_prompt_length is not None and c.data.max_prompt_length != prompt:
        raise InputError(f"data.max_prompt_length={c.data.max_prompt_length} but {train_data.prefix} was "
                         f"preprocessed with {prompt}: prompts are cut when preprocessing, so preprocess again "
                         "with --max-prompt-length or leave the setting out")
    o = c.optimizer
    if o.optimizer == "rmsprop" and "optimizer.adam_beta1" in said and o.adam_beta1 != 0:
        raise InputError(f"optimizer.adam_beta1={o.adam_beta1} has no effect with optimizer=rmsprop "
                         "(RMSprop is Adam with beta1 = 0); leave it out or use optimizer=adam")
    gpu = torch.cuda.is_available()
    if o.bf16 and not gpu and "optimizer.bf16" in said:
        raise InputError("optimizer.bf16=true needs a GPU; CPU runs are fp32 (leave it out there)")
    optimizer = dataclasses.replace(o, adam_beta1=0.0 if o.optimizer == "rmsprop" else o.adam_beta1,
                                    bf16=o.bf16 and gpu)
    data = dataclasses.replace(c.data, max_prompt_length=min(prompt, c.data.max_length - 1))
    resolved = dataclasses.replace(c, model=model, data=data, optimizer=optimizer)
    resolved.check_lengths()
    return resolved


def check_inputs(c: Config, train_data: PreferenceDataset, valid_data: PreferenceDataset | None) -> None:
    """The datasets against the config and the checkpoint, and against each other (before any work)."""
    datasets = [d for d in (train_data, valid_data) if d is not None]
    for d in datasets:
        m = d.manifest
        if m["tokenizer"]["vocab_size"] > c.model.vocab_size:
            raise InputError(f"{d.prefix}: tokenizer vocabulary {m['tokenizer']['vocab_size']} exceeds "
                             f"model.vocab_size {c.model.vocab_size}")
        if m["max_length"] > c.data.max_length:
            raise InputError(f"{d.prefix} was preprocessed with max_length {m['max_length']}, "
                             f"more than data.max_length {c.data.max_length}")
        if c.data.paired and not d.paired:
            raise InputError(f"{d.prefix} is unpaired data but data.paired=True")
    _check_reference_checkpoint(c, train_data, valid_data)
    for d in datasets:
        check_tokenized_for(d.prefix, d.manifest, c.train.load)
    if valid_data is not None:
        a, b = train_data.manifest, valid_data.manifest
        if a["tokenizer"]["sha256"] != b["tokenizer"]["sha256"]:
            raise InputError(f"{train_data.prefix} and {valid_data.prefix} were tokenised with "
                             f"different tokenizers ({a['tokenizer']['path']} vs {b['tokenizer']['path']})")
        ea, eb = train_data.embedding_manifest, valid_data.embedding_manifest
        if ea and eb and (ea["model"], ea["dim"]) != (eb["model"], eb["dim"]):
            raise InputError(f"prompt embeddings differ: {ea['model']} ({ea['dim']}) for training, "
                             f"{eb['model']} ({eb['dim']}) for validation")


def _check_reference_checkpoint(c: Config, train_data: PreferenceDataset,
                                valid_data: PreferenceDataset | None) -> None:
    """Precomputed reference log-probs must come from ``loss.reference_checkpoint`` (default
    ``train.load``): by the checkpoint id both record, else by path."""
    if not (c.loss.uses_reference and c.loss.reference == "precomputed"):
        return
    expected = c.loss.reference_checkpoint or c.train.load
    expected_id = ConvertedCheckpoint(expected).meta.get("checkpoint_id")
    for d in (train_data, valid_data):
        if d is None:
            continue
        m = read_manifest(reference_prefix(d.prefix), REFERENCE_KIND)
        recorded = m.get("checkpoint")
        if m.get("checkpoint_id") and expected_id:
            same = m["checkpoint_id"] == expected_id
        else:  # written before checkpoints had ids
            same = recorded is None or os.path.realpath(recorded) == os.path.realpath(expected)
        if not same:
            setting = "loss.reference_checkpoint" if c.loss.reference_checkpoint else "train.load"
            raise InputError(f"{manifest_path(reference_prefix(d.prefix))}: the reference log-probs were computed "
                             f"with {recorded}, but {setting} is {expected}: rerun tools/precompute_reference_logps"
                             f".py --load {expected} --data-prefix {d.prefix}, or, when the reference is meant to "
                             f"be that other model, set loss.reference_checkpoint={recorded}")
