"""AlpacaEval: a model's answers to AlpacaEval's instructions, in ``alpaca_eval``'s
``model_outputs.json`` format (``instruction``, ``output``, ``generator``, and the prompt file's
other fields kept), so ``alpaca_eval --model_outputs FILE`` runs on it unchanged.

Each instruction is one user message, rendered as training renders message lists (the tokenizer's
chat template, or HH style without one) and cut to ``max_prompt_length`` tokens.
"""

from __future__ import annotations

import hashlib
import json

from megatron_rpo.data.preprocess import Encoder
from megatron_rpo.errors import InputError
from megatron_rpo.evaluate.generation import Store, generate_missing
from megatron_rpo.evaluate.items import EvalItem, cut_prompt
from megatron_rpo.publish import write_text

__all__ = ["read_instructions", "write_alpaca_eval_outputs"]


def read_instructions(path: str) -> list[dict]:
    """The prompt file's rows: a JSON list (AlpacaEval's ``alpaca_eval.json``) or JSON lines, each
    with a non-empty ``instruction``.

    Raises:
        InputError: naming the file, the row and the field.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise InputError(f"--alpaca-eval-prompts {path}: {e.strerror}") from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError:
        rows = []
        for line_number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{line_number}: neither a JSON list nor JSON lines ({e.msg})") from None
    if not isinstance(rows, list) or not rows:
        raise InputError(f"{path}: expected a non-empty JSON list of {{instruction, ...}} objects")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) or not row["instruction"].strip():
            raise InputError(f"{path}: row {i}: field 'instruction' is missing or empty")
    return rows


def write_alpaca_eval_outputs(prompts_path: str, out_path: str, name: str, generator, tokenizer, cache_path: str, *,
                              max_prompt_length: int = 256, progress: bool = True) -> int:
    """Answer every instruction of ``prompts_path`` with ``generator`` (cached in ``cache_path``)
    and write ``out_path`` whole; returns the number of answers."""
    rows = read_instructions(prompts_path)
    encoder = Encoder(tokenizer, max_prompt_length, max_prompt_length + 1)
    items = []
    for i, row in enumerate(rows):
        question = encoder.prompt_text([{"role": "user", "content": row["instruction"]}])
        prompt, prompt_tokens = cut_prompt(encoder, question)
        digest = hashlib.sha256(f"alpaca\x00{prompt}".encode()).hexdigest()[:16]
        items.append(EvalItem(digest, f"{prompts_path}[{i}]", prompt, question, "", prompt_tokens))
    responses = generate_missing(name, generator, items, Store(cache_path), progress=progress)
    outputs = [dict(row, output=responses[item.id], generator=name) for row, item in zip(rows, items)]
    write_text(out_path, json.dumps(outputs, indent=2, ensure_ascii=False) + "\n")
    return len(outputs)
