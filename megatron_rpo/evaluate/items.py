"""The held-out prompts a model answers, each with its reference response.

Read from any input the preprocessing tool reads (``hh``, ``pairs``, ``unpaired``, ``tldr``; JSON
lines, Parquet, ``datasets`` folders, hub names), rendered and cut exactly as training renders and
cuts prompts (:class:`megatron_rpo.data.preprocess.Encoder`: the chat template for message lists,
``max_prompt_length`` tokens kept from the end). The reference is the test set's chosen response:
the paper's baseline. Unpaired rows give items from their desirable completions only.

The sample is the same every time for a seed: a permutation of the usable rows, cut to ``samples``.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass

from megatron_rpo.data.formats import BadRow, detect_format, read_examples
from megatron_rpo.data.preprocess import Encoder
from megatron_rpo.data.sources import open_source
from megatron_rpo.errors import InputError

__all__ = ["EvalItem", "cut_prompt", "load_items"]


@dataclass(frozen=True)
class EvalItem:
    """One held-out prompt: where it came from, the text a model continues, and the reference."""

    id: str
    """A digest of the prompt and the reference: the key of every cached generation and judgement."""
    source: str
    """``file:line`` (or ``dataset[split]:row``) of the row."""
    prompt: str
    """The prompt as the model sees it: rendered, cut to ``max_prompt_length`` tokens, without bos."""
    question: str
    """The prompt as a judge reads it: the rendered text before any cut."""
    reference: str
    """The test set's chosen response."""
    prompt_tokens: int
    """Tokens of :attr:`prompt`, bos included (as training counts them)."""

    def as_dict(self) -> dict:
        return asdict(self)


def cut_prompt(encoder: Encoder, question: str) -> tuple[str, int]:
    """The rendered prompt ``question`` as a model sees it, and its tokens (bos included): cut to
    the encoder's ``max_prompt_length`` tokens from the end, as preprocessing cuts it (decoded
    again where it was cut)."""
    tokenizer = encoder.tok
    ids = encoder.prompt_ids(question)
    if len(ids) < encoder.max_prompt:
        return question, len(ids)
    body = ids[1:] if tokenizer.bos_id is not None and ids[:1] == [tokenizer.bos_id] else ids
    return tokenizer.decode(body), len(ids)


def load_items(inputs: list[str], fmt: str | None, tokenizer, *, samples: int | None = 256, seed: int = 0,
               max_prompt_length: int = 256, max_length: int = 512, split: str | None = None,
               chat_template: str | None = None) -> tuple[list[EvalItem], list[BadRow]]:
    """The first ``samples`` items of a seeded permutation of the usable rows (all of them for
    None), and the rows that could not be used (named by file, line and field).

    ``tokenizer`` is a loaded :class:`~megatron_rpo.data.tokenizer.Tokenizer` (the model's).

    Raises:
        InputError: the inputs cannot be read, or no row is usable.
    """
    if not 0 < max_prompt_length < max_length:
        raise InputError(f"need 0 < max_prompt_length < max_length, got {max_prompt_length} and {max_length}")
    if samples is not None and samples < 1:
        raise InputError(f"--samples must be at least 1, got {samples}")
    sources = [open_source(spec, split) for spec in inputs]
    fmt = fmt or detect_format(sources[0].columns)
    if chat_template is not None:
        tokenizer.use_chat_template(chat_template)
    encoder = Encoder(tokenizer, max_prompt_length, max_length)
    items, bad, seen = [], [], set()
    for example in read_examples(sources, fmt):
        if isinstance(example, BadRow):
            bad.append(example)
            continue
        if example.chosen is None:
            continue  # an undesirable unpaired completion: no reference
        try:
            question = encoder.prompt_text(example.prompt)
            reference = encoder.response_text(example.prompt, example.chosen)
        except (ValueError, TypeError, KeyError) as e:
            bad.append(BadRow(example.file, example.line, "prompt", f"cannot render: {e}"))
            continue
        prompt, prompt_tokens = cut_prompt(encoder, question)
        digest = hashlib.sha256(f"{prompt}\x00{reference}".encode()).hexdigest()[:16]
        if digest in seen:
            continue  # the same prompt and reference twice: one item
        seen.add(digest)
        items.append(EvalItem(digest, f"{example.file}:{example.line}", prompt, question, reference.strip(),
                              prompt_tokens))
    if not items:
        raise InputError(f"no usable held-out row in {', '.join(inputs)} ({len(bad)} bad rows"
                         + (f", e.g. {bad[0]})" if bad else ")"))
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    chosen = order if samples is None else order[:samples]
    return [items[i] for i in chosen], bad
