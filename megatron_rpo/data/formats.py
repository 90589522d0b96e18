"""Input formats of preference data, with every bad row named by file, line and field.

* ``hh``: Anthropic HH-RLHF lines ``{"chosen": dialogue, "rejected": dialogue}``. The prompt is
  everything up to and including the last ``"\\n\\nAssistant:"``, the response what follows;
  chosen and rejected must share that prompt.
* ``pairs``: ``{"prompt", "chosen", "rejected"}``, each a string or an OpenAI-style message list
  (``[{"role": ..., "content": ...}]``), rendered with the tokenizer's chat template.
* ``unpaired``: ``{"prompt", "completion", "label": true|false}``; ``label`` true means the
  completion is a chosen (desirable) one.
* ``tldr``: the Reddit TL;DR comparisons of "Learning to summarize from human feedback"
  (``openai/summarize_from_feedback``): ``{"info": {"post", "title", "subreddit"}, "summaries":
  [{"text"}, {"text"}], "choice": 0|1}``; the prompt is :data:`TLDR_PROMPT` filled in, the chosen
  response the summary ``choice`` names (with a leading space, as after ``TL;DR:``).

Rows come from JSON lines, Parquet, ``datasets`` folders or the hub (:mod:`.sources`); a bad row
is named by its source (a file, or ``dataset[split]``), its line (JSON lines, 1-based) or row
index (datasets, 0-based), and the field. :func:`detect_format` picks the format from the columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Union

from megatron_rpo.data.sources import RowError, Source
from megatron_rpo.errors import InputError

__all__ = ["FORMATS", "TLDR_PROMPT", "Example", "BadRow", "read_examples", "detect_format"]

FORMATS = ("hh", "pairs", "unpaired", "tldr")
HH_ASSISTANT = "\n\nAssistant:"
TLDR_PROMPT = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
"""The usual prompt of the TL;DR summarization task (OpenAI's and TRL's)."""

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


def _parse_tldr(row: dict, file: str, line: int) -> Example:
    info = row.get("info")
    if not isinstance(info, dict):
        raise BadRow(file, line, "info", "missing" if info is None else "expected {post, title, subreddit}")
    fields = {}
    for key in ("post", "title", "subreddit"):
        value = info.get(key)
        if key == "title" and value is None:
            value = ""  # some comparisons have no title
        if not isinstance(value, str) or (key == "post" and not value.strip()):
            raise BadRow(file, line, f"info.{key}", "missing" if value is None else "expected a non-empty string")
        fields[key] = value.strip()
    summaries = row.get("summaries")
    if not (isinstance(summaries, list) and len(summaries) == 2):
        raise BadRow(file, line, "summaries", "expected a list of two {text} objects")
    texts = []
    for i, summary in enumerate(summaries):
        text = summary.get("text") if isinstance(summary, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise BadRow(file, line, f"summaries[{i}].text", "missing or empty")
        texts.append(" " + text.strip())
    choice = row.get("choice")
    if choice not in (0, 1) or isinstance(choice, bool):
        raise BadRow(file, line, "choice", f"expected 0 or 1, got {choice!r}")
    return Example(file, line, TLDR_PROMPT.format(**fields), texts[choice], texts[1 - choice])


def _parse(fmt: str, row: dict, file: str, line: int) -> Example:
    if fmt == "tldr":
        return _parse_tldr(row, file, line)
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


def detect_format(columns: list[str]) -> str:
    """``unpaired``, ``pairs`` or ``hh`` from a source's columns (or its first JSON object's keys).

    Raises:
        ValueError: the columns fit none of the formats.
    """
    cols = set(columns)
    if {"info", "summaries", "choice"} <= cols:
        return "tldr"
    if {"prompt", "completion", "label"} <= cols:
        return "unpaired"
    if {"prompt", "chosen", "rejected"} <= cols:
        return "pairs"
    if {"chosen", "rejected"} <= cols:
        return "hh"
    raise InputError(f"cannot tell the format from the columns {sorted(cols)}: hh needs chosen and rejected, pairs "
                     "prompt, chosen and rejected, unpaired prompt, completion and label, tldr info, summaries and "
                     "choice; give --format")


def read_examples(sources: list[Source], fmt: str) -> Iterator[Example | BadRow]:
    """Yield an :class:`Example` for every good row and a :class:`BadRow` for every bad one.

    Blank lines are skipped silently.
    """
    if fmt not in FORMATS:
        raise InputError(f"format must be one of {FORMATS}, got {fmt!r}")
    for source in sources:
        for index, row in source.rows():
            if isinstance(row, RowError):
                yield BadRow(source.name, index, row.field, row.reason)
                continue
            try:
                yield _parse(fmt, row, source.name, index)
            except BadRow as bad:
                yield bad
