"""Where preference rows come from: JSON lines, Parquet, ``datasets`` folders and hub datasets.

:func:`open_source` turns one ``--input`` into a :class:`Source` that yields ``(index, row)``:

* ``.jsonl`` / ``.jsonl.gz`` files (UTF-8): ``index`` is the 1-based line number. A line that is
  not valid UTF-8 or not a JSON object is a :class:`~megatron_rpo.data.formats.BadRow`; a file
  that is not UTF-8 text at all (UTF-16, compressed under another name, binary) or a truncated
  ``.gz`` is one error naming the file and what it looks like;
* ``.parquet`` files, folders written by ``datasets``' ``save_to_disk``, local dataset folders and
  hub datasets (``owner/name`` or ``hf://owner/name``, with ``--split``): read through the
  ``datasets`` library (``pip install 'megatron_rpo[hf]'``); ``index`` is the 0-based row index
  and the source is named ``NAME[split]``. Hub names need network access (or a warm cache).

Rows are dicts: a JSON object, or a dataset row (strings, message lists, bools).
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

from megatron_rpo.data.tokenizer import file_sha256
from megatron_rpo.errors import InputError

__all__ = ["Source", "open_source", "check_text_file", "RowError"]

# Leading bytes of files that are not UTF-8 JSON lines, and what to tell the user.
_SIGNATURES = (
    (b"\x1f\x8b", "gzip-compressed data, but its name does not end in .gz (rename it to .jsonl.gz)"),
    (b"BZh", "bzip2-compressed data (decompress it first)"),
    (b"\xfd7zXZ\x00", "xz-compressed data (decompress it first)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed data (decompress it first)"),
    (b"PK\x03\x04", "a zip archive (extract it first)"),
    (b"PAR1", "a Parquet file, but its name does not end in .parquet"),
    (b"\xff\xfe", "UTF-16 text (convert it to UTF-8)"),
    (b"\xfe\xff", "UTF-16 text (convert it to UTF-8)"),
)


@dataclass
class RowError:
    """A row that could not even be read as a dict (what it is, for a BadRow)."""

    field: str
    reason: str


@dataclass
class Source:
    """One input: its name for messages, its manifest entry, its column names and its rows."""

    name: str
    identity: dict
    columns: list[str]
    _rows: Callable[[], Iterator[tuple[int, dict | RowError]]] = field(repr=False)

    def rows(self) -> Iterator[tuple[int, dict | RowError]]:
        return self._rows()


def check_text_file(path: str) -> None:
    """Raise ValueError naming ``path`` unless it can be read as (gzipped, for .gz) UTF-8 text lines."""
    if not os.path.isfile(path):
        raise InputError(f"input file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(4096)
    if path.endswith(".gz"):
        if not head.startswith(b"\x1f\x8b"):
            raise InputError(f"{path}: the name ends in .gz but the file is not gzip-compressed")
        return
    for magic, what in _SIGNATURES:
        if head.startswith(magic):
            raise InputError(f"{path}: this looks like {what}, not UTF-8 JSON lines")
    if b"\x00" in head:
        raise InputError(f"{path}: this looks like a binary file (it holds NUL bytes), not UTF-8 JSON lines")


def _json_lines(path: str) -> Iterator[tuple[int, dict | RowError]]:
    opener = gzip.open if path.endswith(".gz") else open
    number = 0
    try:
        with opener(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield number, RowError("<text>", f"not valid UTF-8: byte 0x{raw[e.start]:02x} at column "
                                                     f"{e.start + 1}")
                    continue
                if not text.strip():
                    continue
                try:
                    row = json.loads(text.rstrip("\r\n"))
                except json.JSONDecodeError as e:
                    # e.msg may end in " at" ("Unterminated string starting at"); the column says where.
                    yield number, RowError("<json>", f"malformed JSON at column {e.colno}: "
                                                     f"{e.msg.removesuffix(' at')}")
                    continue
                if not isinstance(row, dict):
                    yield number, RowError("<json>", f"expected an object, got {type(row).__name__}")
                    continue
                yield number, row
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise InputError(f"{path}: the gzip data is truncated or corrupt after line {number} ({e})") from None


def _first_json_keys(path: str) -> list[str]:
    for _, row in _json_lines(path):
        if isinstance(row, dict):
            return list(row)
    return []


def _datasets():
    try:
        import datasets
    except ImportError:
        raise InputError("Parquet files, dataset folders and hub datasets are read with the datasets library: "
                         "pip install 'megatron_rpo[hf]'") from None
    datasets.disable_progress_bars()
    return datasets


def _pick_split(loaded, name: str, split: str | None):
    """A Dataset from a Dataset or a DatasetDict, choosing ``split`` (or the only one)."""
    if not hasattr(loaded, "keys"):  # already one split
        return loaded, split
    splits = list(loaded.keys())
    if split is None:
        if len(splits) != 1:
            raise InputError(f"{name} has the splits {splits}; choose one with --split")
        split = splits[0]
    if split not in loaded:
        raise InputError(f"{name} has no split {split!r}; it has {splits}")
    return loaded[split], split


def _dataset_source(name: str, dataset, split: str | None, identity: dict) -> Source:
    label = f"{name}[{split}]" if split else name

    def rows():
        for index, row in enumerate(dataset):
            yield index, row

    return Source(label, dict(identity, split=split, num_rows=len(dataset), fingerprint=dataset._fingerprint),
                  list(dataset.column_names), rows)


def open_source(spec: str, split: str | None = None) -> Source:
    """The input ``spec`` names (module docstring).

    Raises:
        ValueError: it does not exist, cannot be read, or needs the missing ``datasets`` library.
    """
    hub = spec.startswith("hf://")
    path = spec[len("hf://"):] if hub else spec
    if not hub and os.path.isfile(path):
        if path.endswith(".parquet"):
            ds = _datasets().load_dataset("parquet", data_files=os.path.abspath(path), split="train")
            return _dataset_source(path, ds, None, {"path": os.path.abspath(path), "sha256": file_sha256(path)})
        check_text_file(path)
        return Source(path, {"path": os.path.abspath(path), "sha256": file_sha256(path)}, _first_json_keys(path),
                      lambda: _json_lines(path))
    if not hub and os.path.isdir(path):
        datasets = _datasets()
        saved = any(os.path.exists(os.path.join(path, f)) for f in ("dataset_info.json", "dataset_dict.json",
                                                                    "state.json"))
        try:
            loaded = datasets.load_from_disk(path) if saved else datasets.load_dataset(path)
        except Exception as e:  # noqa: BLE001 - datasets raises many kinds; the user needs the path and the cause
            raise InputError(f"input {path} is a folder but not a dataset that datasets can read "
                             f"(save_to_disk output or a folder of data files): {e}") from None
        ds, split = _pick_split(loaded, path, split)
        return _dataset_source(path, ds, split, {"path": os.path.abspath(path), "kind": "datasets folder"})
    if hub or (path.count("/") == 1 and not path.startswith((".", "/"))):
        datasets = _datasets()
        try:
            loaded = datasets.load_dataset(path, split=split) if split else datasets.load_dataset(path)
        except Exception as e:  # noqa: BLE001
            raise InputError(f"cannot load the dataset {path!r}{f' split {split!r}' if split else ''} "
                             f"(hub datasets need network access or a cached copy): {e}") from None
        ds, split = _pick_split(loaded, path, split)
        return _dataset_source(path, ds, split, {"dataset": path, "kind": "hub"})
    raise InputError(f"input file {path} does not exist")
