"""Preference rows -> tokenised Megatron IndexedDataset + per-sequence metadata + manifest.

For a prefix P the outputs are:

* ``P.bin`` / ``P.idx``: megatron-core IndexedDataset, one item per sequence (prompt + response
  tokens, ``bos`` first and ``eos`` last when the tokenizer has them). Pairs are stored as
  chosen then rejected.
* ``P.meta.npy``: a structured array with one record per sequence: ``prompt_length``,
  ``is_chosen``, ``pair_id`` (-1 for unpaired items) and ``prompt_id``.
* ``P.prompts.jsonl``: the distinct prompt texts, line ``prompt_id`` (what embeddings are made of).
* ``P.manifest.json``: counts, the tokenizer, source file hashes, truncation counts, every
  skipped row (file, line, field, reason) and the size and hash of each output file.

Truncation follows the paper (256 / 512 by default): keep the end of the prompt, then cut the
response to fit the total length.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from megatron_rpo.data.files import StagedOutputs
from megatron_rpo.data.formats import BadRow, Example, detect_format, read_examples
from megatron_rpo.data.sources import open_source
from megatron_rpo.data.tokenizer import Tokenizer, load_tokenizer
from megatron_rpo.errors import InputError

__all__ = ["META_DTYPE", "PreprocessResult", "preprocess", "MANIFEST_KIND", "Encoder"]

MANIFEST_KIND = "preference_tokens"
META_DTYPE = np.dtype([("prompt_length", np.int32), ("is_chosen", np.bool_), ("pair_id", np.int64),
                       ("prompt_id", np.int64)])


@dataclass
class PreprocessResult:
    prefix: str
    manifest: dict


class Encoder:
    """Render and tokenise prompts and responses with the length limits: training's rendering,
    which evaluation (:mod:`megatron_rpo.evaluate.items`) uses for the prompts it generates from."""

    def __init__(self, tokenizer: Tokenizer, max_prompt_length: int, max_length: int):
        self.tok, self.max_prompt, self.max_length = tokenizer, max_prompt_length, max_length
        self.truncated_prompts = 0
        self.truncated_responses = 0
        self.rendered_messages = False  # whether any message list was rendered (the manifest says how)

    def prompt_text(self, prompt) -> str:
        if isinstance(prompt, str):
            return prompt
        self._note_messages()
        return self.tok.render(prompt, add_generation_prompt=True)

    def _note_messages(self) -> None:
        if not self.rendered_messages and self.tok.chat_rendering == "hh":
            print(f"note: {self.tok.path} has no chat template, so message lists are rendered HH style "
                  "('\\n\\nHuman: ...\\n\\nAssistant: ...'); --chat-template FILE supplies one", file=sys.stderr,
                  flush=True)
        self.rendered_messages = True

    def response_text(self, prompt, response) -> str:
        if isinstance(response, str):
            return response
        self._note_messages()
        # A message list: the chat-rendered conversation minus the rendered prompt.
        prompt_messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        head = self.tok.render(prompt_messages, add_generation_prompt=True)
        full = self.tok.render(prompt_messages + response, add_generation_prompt=False)
        if not full.startswith(head):
            raise InputError("the chat template renders the prompt differently inside the conversation")
        return full[len(head):]

    def prompt_ids(self, text: str) -> list[int]:
        ids = self.tok.encode(text)
        bos = self.tok.bos_id
        if bos is not None and ids[:1] == [bos]:
            # A chat template that starts with {{ bos_token }} (Llama-3, Mistral-Instruct) already
            # put it in the text; exactly one is added below, whatever the template does.
            ids = ids[1:]
        room = self.max_prompt - (bos is not None)
        if len(ids) > room:
            ids = ids[-room:]  # keep the end of the prompt: the turn being answered
            self.truncated_prompts += 1
        return ([bos] if bos is not None else []) + ids

    def response_ids(self, body: list[int], prompt_length: int) -> list[int]:
        ids = body + [self.tok.eos_id]
        room = self.max_length - prompt_length
        if len(ids) > room:
            ids = ids[:room]
            self.truncated_responses += 1
        return ids


def _check_prefix(prefix: str) -> None:
    if not os.path.basename(prefix) or prefix.endswith(("/", os.sep)):
        raise InputError(f"the output prefix {prefix!r} ends in a path separator; it names files, "
                         f"e.g. {os.path.join(prefix, 'train')!r} writes train.bin, train.idx, ... there")


def preprocess(
    inputs: list[str],
    fmt: str | None,
    tokenizer: str | Tokenizer,
    output_prefix: str,
    *,
    max_prompt_length: int = 256,
    max_length: int = 512,
    strict: bool = False,
    keep_identical_pairs: bool = False,
    progress: bool = True,
    split: str | None = None,
    chat_template: str | None = None,
) -> PreprocessResult:
    """Tokenise preference rows into an IndexedDataset (see the module docstring for the files).

    Args:
        inputs: read in order: ``.jsonl`` / ``.jsonl.gz`` / ``.parquet`` files, ``datasets`` folders,
            hub dataset names (:func:`megatron_rpo.data.sources.open_source`).
        fmt: ``hh``, ``pairs`` or ``unpaired``; None detects it from the first input's columns.
        tokenizer: a sentencepiece ``.model`` file, a Hugging Face tokenizer directory, or a loaded one.
        output_prefix: where the outputs go (``PREFIX.bin`` etc.).
        max_prompt_length: prompt tokens kept (from the end), ``bos`` included.
        max_length: prompt + response tokens kept.
        strict: the first bad row is an error instead of a skipped row.
        keep_identical_pairs: keep pairs whose chosen and rejected responses are the same
            (skipped and listed by default: they carry no preference, only noise).
        progress: show a progress bar with rows/s.
        split: the split of dataset folders and hub datasets with several.
        chat_template: a Jinja chat template file for message lists, replacing the tokenizer's
            own (or the HH-style rendering of a tokenizer without one).

    Raises:
        ValueError: bad options or inputs (a file that is not UTF-8 JSON lines, an output that
            cannot be written), a bad row under ``strict`` (naming file:line:field), no usable
            row at all, or unpaired data with no chosen or no rejected item. Nothing is left at
            ``output_prefix`` then.
    """
    if not 0 < max_prompt_length < max_length:
        raise InputError(
            f"need 0 < max_prompt_length < max_length to leave room for a response, "
            f"got max_prompt_length={max_prompt_length}, max_length={max_length}"
        )
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    _check_prefix(output_prefix)
    sources = [open_source(spec, split) for spec in inputs]
    detected = fmt is None
    if detected:
        fmt = detect_format(sources[0].columns)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    if chat_template is not None:
        tok.use_chat_template(chat_template)
    encoder = Encoder(tok, max_prompt_length, max_length)
    paired = fmt != "unpaired"
    token_dtype = DType.optimal_dtype(tok.vocab_size)
    prompt_ids: dict[str, int] = {}
    meta: list[tuple] = []
    skipped: list[dict] = []
    rows = 0
    with StagedOutputs() as staged:
        bin_path, idx_path = f"{output_prefix}.bin", f"{output_prefix}.idx"
        builder = IndexedDatasetBuilder(staged.path(bin_path), dtype=token_dtype)
        prompts_path = f"{output_prefix}.prompts.jsonl"
        with open(staged.path(prompts_path), "w") as prompts_file:
            bar = tqdm(read_examples(sources, fmt), unit=" rows", desc="preprocess", disable=not progress)
            for item in bar:
                rows += 1
                try:
                    if isinstance(item, BadRow):
                        raise item
                    sequences = _encode_example(item, encoder, keep_identical_pairs)
                except BadRow as bad:
                    if strict:
                        raise InputError(f"bad row (--strict): {bad}") from None
                    skipped.append(bad.as_dict())
                    continue
                prompt_text = sequences[0][0]
                if prompt_text not in prompt_ids:
                    prompt_ids[prompt_text] = len(prompt_ids)
                    prompts_file.write(json.dumps(prompt_text) + "\n")
                pair_id = len(meta) // 2 if paired else -1
                for _, ids, prompt_length, is_chosen in sequences:
                    builder.add_item(torch.tensor(ids, dtype=torch.int64))
                    builder.end_document()
                    meta.append((prompt_length, is_chosen, pair_id, prompt_ids[prompt_text]))
            bar.close()
        if not meta:
            raise InputError(f"no usable row in {inputs} ({len(skipped)} skipped; first: {skipped[:1]})")
        if not paired:
            chosen = sum(1 for m in meta if m[1])
            if chosen == 0 or chosen == len(meta):
                raise InputError(f"{inputs}: unpaired data needs both chosen (label true) and rejected (label false) "
                                 f"items to contrast; found {chosen} chosen and {len(meta) - chosen} rejected")
        builder.finalize(staged.path(idx_path))
        meta_path = f"{output_prefix}.meta.npy"
        with open(staged.path(meta_path), "wb") as f:
            np.save(f, np.array(meta, dtype=META_DTYPE))
        manifest = {
            "kind": MANIFEST_KIND,
            "version": 1,
            "format": fmt,
            "format_detected": detected,
            # How message lists became text: "template" or "hh"; None when there were none.
            "chat_rendering": tok.chat_rendering if encoder.rendered_messages else None,
            "chat_template_file": os.path.abspath(chat_template) if chat_template else None,
            "paired": paired,
            "num_rows": rows,
            "num_sequences": len(meta),
            "num_pairs": len(meta) // 2 if paired else 0,
            "num_prompts": len(prompt_ids),
            "num_skipped": len(skipped),
            "keep_identical_pairs": keep_identical_pairs,
            "truncated_prompts": encoder.truncated_prompts,
            "truncated_responses": encoder.truncated_responses,
            "max_prompt_length": max_prompt_length,
            "max_length": max_length,
            "token_dtype": np.dtype(token_dtype).name,
            "tokenizer": tok.identity(),
            "sources": [source.identity for source in sources],
            "files": [staged.describe(p) for p in (bin_path, idx_path, meta_path, prompts_path)],
            "skipped": skipped,
        }
        staged.write_manifest(output_prefix, manifest)
    return PreprocessResult(output_prefix, manifest)


def _encode_example(example: Example, encoder: Encoder,
                    keep_identical: bool = False) -> list[tuple[str, list[int], int, bool]]:
    """``[(prompt text, token ids, prompt length, is_chosen)]``: the chosen first for pairs."""
    if example.chosen is not None and example.chosen == example.rejected and not keep_identical:
        raise BadRow(example.file, example.line, "rejected",
                     "identical to chosen: the pair carries no preference (--keep-identical-pairs keeps it)")
    try:
        prompt_text = encoder.prompt_text(example.prompt)
    except (ValueError, TypeError, KeyError) as e:
        raise BadRow(example.file, example.line, "prompt", f"cannot render: {e}") from None
    prompt = encoder.prompt_ids(prompt_text)
    out = []
    for field, response, is_chosen in (("chosen", example.chosen, True), ("rejected", example.rejected, False)):
        if response is None:
            continue
        try:
            text = encoder.response_text(example.prompt, response)
        except (ValueError, TypeError, KeyError) as e:
            raise BadRow(example.file, example.line, field, f"cannot render: {e}") from None
        body = encoder.tok.encode(text)
        if not body:
            raise BadRow(example.file, example.line, field, "the response has no tokens")
        out.append((prompt_text, prompt + encoder.response_ids(body, len(prompt)), len(prompt), is_chosen))
    return out
