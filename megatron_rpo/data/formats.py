"""Input formats of preference data, with every bad row named by file, line and field.

* ``hh``: Anthropic HH-RLHF lines ``{"chosen": dialogue, "rejected": dialogue}``. The prompt is
  everything up to and including the last ``"\\n\\nAssistant:"``, the response what follows;
  chosen and rejected must share that prompt.
* ``pairs``: ``{"prompt", "chosen", "rejected"}``, each a string or an OpenAI-style message list
  (``[{"role": ..., "content": ...}]``), rendered with the tokenizer's chat template.
* ``unpaired``: ``{"prompt", "completion", "label": true|false}``; ``label`` true means the
  completion is a chosen (desirable) one.

Files are ``.jsonl`` or ``.jsonl.gz``, UTF-8. A line that is not valid UTF-8 is a bad row like
any other; a file that is not UTF-8 text at all (UTF-16, compressed under another name, binary)
or a truncated ``.gz`` is one error naming the file and what it looks like.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from dataclasses import dataclass
from typing import Iterator, Union

__all__ = ["FORMATS", "Example", "BadRow", "read_examples", "check_text_file"]

FORMATS = ("hh", "pairs", "unpaired")
HH_ASSISTANT = "\n\nAssistant:"

Text = Union[str, list]  # a string, or a list of {"role", "content"} messages


@dataclass
class Example:
    """One prompt with its chosen and/or rejected response (before tokenisation)."""

    file: str
    line: int
    prompt: Text
    chosen: Text | None = None
    rejected: Text | None = None


@dataclass
class BadRow(Exception):
    """A row that cannot be used: where it is and why."""

    file: str
    line: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: field {self.field!r}: {self.reason}"

    def as_dict(self) -> dict:
        return {"file": self.file, "line": self.line, "field": self.field, "reason": self.reason}


# Leading bytes of files that are not UTF-8 JSON lines, and what to tell the user.
_SIGNATURES = (
    (b"\x1f\x8b", "gzip-compressed data, but its name does not end in .gz (rename it to .jsonl.gz)"),
    (b"BZh", "bzip2-compressed data (decompress it first)"),
    (b"\xfd7zXZ\x00", "xz-compressed data (decompress it first)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed data (decompress it first)"),
    (b"PK\x03\x04", "a zip archive (extract it first)"),
    (b"\xff\xfe", "UTF-16 text (convert it to UTF-8)"),
    (b"\xfe\xff", "UTF-16 text (convert it to UTF-8)"),
)


def check_text_file(path: str) -> None:
    """Raise ValueError naming ``path`` unless it can be read as (gzipped, for .gz) UTF-8 text lines."""
    if os.path.isdir(path):
        raise ValueError(f"input {path} is a directory; give .jsonl or .jsonl.gz files")
    if not os.path.isfile(path):
        raise ValueError(f"input file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(4096)
    if path.endswith(".gz"):
        if not head.startswith(b"\x1f\x8b"):
            raise ValueError(f"{path}: the name ends in .gz but the file is not gzip-compressed")
        return
    for magic, what in _SIGNATURES:
        if head.startswith(magic):
            raise ValueError(f"{path}: this looks like {what}, not UTF-8 JSON lines")
    if b"\x00" in head:
        raise ValueError(f"{path}: this looks like a binary file (it holds NUL bytes), not UTF-8 JSON lines")


def _lines(path: str) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw bytes)``; a truncated or corrupt gzip stream is a ValueError naming the file."""
    opener = gzip.open if path.endswith(".gz") else open
    number = 0
    try:
        with opener(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                yield number, raw
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path}: the gzip data is truncated or corrupt after line {number} ({e})") from None


def _text(row: dict, field: str, file: str, line: int) -> Text:
    if field not in row:
        raise BadRow(file, line, field, "missing")
    value = row[field]
    if isinstance(value, str):
        if not value.strip():
            raise BadRow(file, line, field, "empty")
        return value
    if isinstance(value, list):
        if not value:
            raise BadRow(file, line, field, "empty message list")
        for i, message in enumerate(value):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                raise BadRow(file, line, f"{field}[{i}]", "a message must be {'role': str, 'content': str}")
        return value
    raise BadRow(file, line, field, f"expected a string or a message list, got {type(value).__name__}")


def _split_hh(dialogue: str, field: str, file: str, line: int) -> tuple[str, str]:
    cut = dialogue.rfind(HH_ASSISTANT)
    if cut < 0:
        raise BadRow(file, line, field, f"no {HH_ASSISTANT!r} turn to split prompt from response")
    prompt, response = dialogue[: cut + len(HH_ASSISTANT)], dialogue[cut + len(HH_ASSISTANT):]
    if not response.strip():
        raise BadRow(file, line, field, "empty response after the last Assistant turn")
    return prompt, response


def _parse(fmt: str, row: dict, file: str, line: int) -> Example:
    if fmt == "hh":
        chosen, rejected = _text(row, "chosen", file, line), _text(row, "rejected", file, line)
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            raise BadRow(file, line, "chosen" if not isinstance(chosen, str) else "rejected",
                         "hh dialogues are strings")
        prompt, chosen_response = _split_hh(chosen, "chosen", file, line)
        rejected_prompt, rejected_response = _split_hh(rejected, "rejected", file, line)
        if rejected_prompt != prompt:
            raise BadRow(file, line, "rejected", "its prompt (up to the last Assistant turn) differs from chosen's")
        return Example(file, line, prompt, chosen_response, rejected_response)
    if fmt == "pairs":
        return Example(file, line, _text(row, "prompt", file, line), _text(row, "chosen", file, line),
                       _text(row, "rejected", file, line))
    prompt, completion = _text(row, "prompt", file, line), _text(row, "completion", file, line)
    if "label" not in row:
        raise BadRow(file, line, "label", "missing")
    if not isinstance(row["label"], bool):
        raise BadRow(file, line, "label", f"expected true or false, got {row['label']!r}")
    if row["label"]:
        return Example(file, line, prompt, chosen=completion)
    return Example(file, line, prompt, rejected=completion)


def read_examples(paths: list[str], fmt: str) -> Iterator[Example | BadRow]:
    """Yield an :class:`Example` for every good row and a :class:`BadRow` for every bad one.

    Blank lines are skipped silently. Line numbers are 1-based.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    for path in paths:
        check_text_file(path)
        for number, raw in _lines(path):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield BadRow(path, number, "<text>", f"not valid UTF-8: byte 0x{raw[e.start]:02x} at column "
                                                     f"{e.start + 1}")
                continue
            if not text.strip():
                continue
            try:
                row = json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                # e.msg may end in " at" ("Unterminated string starting at"); the column says where.
                yield BadRow(path, number, "<json>", f"malformed JSON at column {e.colno}: {e.msg.removesuffix(' at')}")
                continue
            if not isinstance(row, dict):
                yield BadRow(path, number, "<json>", f"expected an object, got {type(row).__name__}")
                continue
            try:
                yield _parse(fmt, row, path, number)
            except BadRow as bad:
                yield bad
