"""Reading Hugging Face safetensors and reading/writing our converted checkpoint directory.

Converted checkpoint layout (Megatron names, whole tensors, see :mod:`.layout`)::

    DIR/megatron_rpo_checkpoint.json   kind, ModelConfig, architecture, dtype, tensor -> file index
    DIR/hf_config.json                 the source config.json, for the way back
    DIR/weights/embedding.safetensors, layer_00000.safetensors ..., final.safetensors
    DIR/tokenizer/                     the tokenizer files of the source

One file per layer keeps conversion memory at about one layer. A directory is written under a
temporary name and renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_rpo.errors import InputError

__all__ = ["HFWeights", "ConvertedCheckpoint", "MARKER", "copy_tokenizer", "TOKENIZER_FILES"]

MARKER = "megatron_rpo_checkpoint.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "generation_config.json")


class HFWeights:
    """Lazy access to a Hugging Face checkpoint's safetensors (one file, or sharded with an index)."""

    def __init__(self, hf_dir: str):
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        single = os.path.join(hf_dir, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            self.files = {name: os.path.join(hf_dir, file) for name, file in weight_map.items()}
        elif os.path.exists(single):
            self.files = {name: single for name in _read_safetensors(single, lambda f: list(f.keys()))}
        else:
            found = sorted(os.listdir(hf_dir))
            raise InputError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json (found {found}); "
                             "only safetensors checkpoints are read")
        for path in set(self.files.values()):
            if not os.path.exists(path):
                raise InputError(f"{hf_dir}: the index names {os.path.basename(path)}, which is missing")

    def names(self) -> set[str]:
        return set(self.files)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise InputError(f"tensor {name!r} is missing from the checkpoint")
        return _read_safetensors(self.files[name], lambda f: f.get_tensor(name), name,
                                 "download or copy the file again")


def _read_safetensors(path: str, read, name: str | None = None, fix: str = "convert the checkpoint again"):
    """``read(safe_open handle)``, with a truncated or corrupt file named in an InputError."""
    try:
        with safe_open(path, "pt") as f:
            return read(f)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError, OSError, ...
        what = f"tensor {name!r}" if name else "its tensor names"
        raise InputError(f"{path}: cannot read {what} ({type(e).__name__}: {e}); the file is truncated or "
                         f"corrupt, {fix}") from e


class ConvertedCheckpoint:
    """A converted checkpoint directory: whole Megatron-layout tensors, read whole or in slices."""

    def __init__(self, path: str):
        marker = os.path.join(path, MARKER)
        try:
            with open(marker) as f:
                self.meta = json.load(f)
        except FileNotFoundError:
            raise InputError(f"{path} is not a converted checkpoint (no {MARKER})") from None
        if self.meta.get("kind") != "converted":
            raise InputError(f"{marker}: expected kind 'converted', got {self.meta.get('kind')!r}")
        self.path = path
        self.index: dict[str, str] = self.meta["index"]

    @property
    def model_config(self):
        from megatron_rpo.config import ModelConfig

        return ModelConfig(**self.meta["model"])

    def _file(self, name: str) -> str:
        if name not in self.index:
            raise InputError(f"{self.path}: no tensor {name!r} in the checkpoint")
        return os.path.join(self.path, self.index[name])

    def _read(self, name: str, read):
        return _read_safetensors(self._file(name), read, name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._read(name, lambda f: tuple(f.get_slice(name).get_shape()))

    def get(self, name: str) -> torch.Tensor:
        return self._read(name, lambda f: f.get_tensor(name))

    def rows(self, name: str, dim: int, ranges: list[tuple[int, int]]) -> torch.Tensor:
        """The tensor cut to ``ranges`` along ``dim`` (concatenated), reading only those bytes."""
        def read(f):
            sl = f.get_slice(name)
            return [sl[start:stop] if dim == 0 else sl[:, start:stop] for start, stop in ranges]

        return torch.cat(self._read(name, read), dim=dim)


def save_tensors(tensors: dict[str, torch.Tensor], path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)


def copy_tokenizer(src_dir: str, dst_dir: str) -> list[str]:
    """Copy the tokenizer files that exist in ``src_dir``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(src_dir, name)):
            os.makedirs(dst_dir, exist_ok=True)
            shutil.copy2(os.path.join(src_dir, name), os.path.join(dst_dir, name))
            copied.append(name)
    return copied
