"""Recipes in and out: the YAML loader (``defaults:``, dotted overrides), the dict form, and the
keys a recipe set.

A YAML recipe holds only what differs from the dataclass defaults::

    defaults: base.yaml          # optional, one level: base.yaml may not have its own defaults
    model:
      num_layers: 2
    loss:
      beta: 0.1

and the command line adds dotted overrides: ``loss.beta=0.2 train.micro_batch_size=4``.
:func:`dump_config` writes the resolved config, which :func:`load_config` reads back unchanged.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import yaml

from megatron_rpo.config.sections import MODEL_TRAINING_CHOICES, Config, ModelConfig
from megatron_rpo.errors import InputError
from megatron_rpo.publish import write_text

__all__ = ["load_config", "config_from_dict", "config_to_dict", "explicit_keys", "model_conflicts", "complete_model",
           "dump_config"]

_SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Config) if f.name != "explicit"}


def config_from_dict(raw: dict, source: str = "config") -> Config:
    """Build a :class:`Config` from ``{section: {key: value}}``; ``source`` names it in errors."""
    if not isinstance(raw, dict):
        raise InputError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    sections = {}
    for name, values in raw.items():
        if name not in _SECTIONS:
            raise InputError(f"{source}: unknown section {name!r}; expected one of {sorted(_SECTIONS)}")
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise InputError(f"{source}: section {name!r} must be a mapping, got {values!r}")
        cls = _SECTIONS[name]
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise InputError(f"{source}: unknown key {name}.{key}; {name} has {sorted(known)}")
        try:
            sections[name] = cls(**values)
        except ValueError as e:
            raise InputError(f"{source}: {e}") from None
    try:
        return Config(**sections)
    except ValueError as e:
        raise InputError(f"{source}: {e}") from None


def config_to_dict(config: Config) -> dict:
    """``{section: {key: value}}`` with every field, the inverse of :func:`config_from_dict`."""
    return {name: dataclasses.asdict(getattr(config, name)) for name in _SECTIONS}


def _read_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise InputError(f"cannot read config {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise InputError(f"{path}: invalid YAML: {e}") from e
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def _merge(base: dict, top: dict) -> dict:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in top.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section].update(values)
        else:
            merged[section] = values
    return merged


def _apply_override(raw: dict, override: str) -> None:
    key, sep, text = override.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise InputError(f"override {override!r} must look like section.key=value (e.g. loss.beta=0.2)")
    section, name = parts
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise InputError(f"override {override!r}: cannot parse value {text!r}: {e}") from e
    section_values = raw.setdefault(section, {})
    if not isinstance(section_values, dict):
        raise InputError(f"override {override!r}: section {section!r} is not a mapping")
    section_values[name] = value


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML recipe (with at most one level of ``defaults:``) and apply dotted overrides.

    Args:
        path: the recipe; None starts from the dataclass defaults.
        overrides: ``section.key=value`` strings; values are parsed as YAML scalars.

    Raises:
        ValueError: unreadable file, nested ``defaults``, unknown section/key, wrong type, or
            conflicting values.
    """
    raw: dict = {}
    source = "command line"
    if path is not None:
        raw = _read_yaml(path)
        source = path
        parent = raw.pop("defaults", None)
        if parent is not None:
            if not isinstance(parent, str):
                raise InputError(f"{path}: defaults must be one file name, got {parent!r}")
            parent_path = os.path.join(os.path.dirname(os.path.abspath(path)), parent)
            base = _read_yaml(parent_path)
            if "defaults" in base:
                raise InputError(
                    f"{path}: its defaults file {parent_path} has defaults of its own; "
                    "only one level of defaults is allowed"
                )
            raw = _merge(base, raw)
    for override in overrides:
        _apply_override(raw, override)
    if overrides:
        source = f"{source} + overrides"
    config = config_from_dict(raw, source)
    # What the recipe and the command line set, as opposed to defaults: the trainer fills the rest
    # of `model` from the checkpoint and checks only what was set against the dataset.
    return dataclasses.replace(config, explicit=frozenset(f"{section}.{key}" for section, values in raw.items()
                                                          if isinstance(values, dict) for key in values))


def explicit_keys(config: Config) -> frozenset | None:
    """The ``section.key`` names a recipe or the command line set (:func:`load_config`); None for a
    Config built otherwise, whose every value counts as set."""
    return config.explicit


def model_conflicts(config: Config, theirs: ModelConfig) -> list[tuple[str, Any, Any]]:
    """``(key, config's value, theirs)`` for every architecture key of ``model`` the config sets
    (all of them for a Config built in code) that differs from ``theirs``, the model of a
    checkpoint or config.json. Training and the memory plan refuse such a config."""
    explicit = explicit_keys(config)
    mine, other = dataclasses.asdict(config.model), dataclasses.asdict(theirs)
    return [(k, mine[k], other[k]) for k in mine
            if k not in MODEL_TRAINING_CHOICES and (explicit is None or f"model.{k}" in explicit)
            and mine[k] != other[k]]


def complete_model(c: Config, theirs: ModelConfig, source: str, has: str = "the checkpoint has") -> ModelConfig:
    """``model`` completed from ``theirs`` (a checkpoint's or a config.json's): the keys the recipe
    or the command line set (every key of a Config built in code) stay, and must agree with it
    where they are the architecture; a training choice that was set wins over theirs.

    Raises:
        InputError: ``source does not fit the config: model.k=... but <has> ...``.
    """
    diff = model_conflicts(c, theirs)
    if diff:
        detail = ", ".join(f"model.{k}={a!r} but {has} {b!r}" for k, a, b in diff)
        raise InputError(f"{source} does not fit the config: {detail}")
    explicit = explicit_keys(c)
    return dataclasses.replace(c.model, **{k: v for k, v in dataclasses.asdict(theirs).items()
                                           if k != "make_vocab_size_divisible_by"
                                           and explicit is not None and f"model.{k}" not in explicit})


def dump_config(config: Config, path: str) -> None:
    """Write the resolved config as YAML (published whole: :func:`megatron_rpo.publish.write_text`)."""
    write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))
