"""Responses to the held-out prompts, from a Hugging Face folder or an OpenAI-compatible endpoint,
cached per prompt and model.

* :class:`HFGenerator`: ``transformers``, batched (left padding), greedy by default;
* :class:`EndpointGenerator`: ``/completions`` of an endpoint serving the model (vLLM, SGLang, TGI,
  ``transformers serve``): the prompt text as training rendered it, concurrent calls.

Each response is at most ``max_new_tokens`` and, with the prompt, ``max_length`` tokens (the
paper's 512). :class:`Store` keeps every response as soon as it exists (one JSON line each), so a
rerun, a second judge or a run stopped by Ctrl-C or a kill asks for nothing twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed

from tqdm import tqdm

from megatron_rpo.errors import InputError
from megatron_rpo.publish import write_text

__all__ = ["Store", "HFGenerator", "EndpointGenerator", "generate_missing", "run_each"]


class Store:
    """An append-only JSON-lines file of records by key: what was kept survives any stop (a line cut
    short by a kill is dropped on reading, and its item asked again)."""

    def __init__(self, path: str):
        self.path = path
        self.records: dict[str, dict] = {}
        self.dropped = 0
        self._lock = threading.Lock()
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                        self.records[record["key"]] = record
                    except (json.JSONDecodeError, KeyError, TypeError):
                        self.dropped += 1
            if self.dropped:  # the file again without the cut line, published whole
                self._rewrite()

    def _rewrite(self) -> None:
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records.values()))

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def add(self, key: str, record: dict) -> None:
        record = dict(record, key=key)
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
            self.records[key] = record


def _settings_digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


class _Sampling:
    """How responses are drawn: at most ``max_new_tokens``, and ``max_length`` with the prompt;
    greedy at temperature 0."""

    def __init__(self, max_new_tokens: int, max_length: int, temperature: float, top_p: float, seed: int):
        self.max_new_tokens, self.max_length = max_new_tokens, max_length
        self.temperature, self.top_p, self.seed = temperature, top_p, seed

    @property
    def settings(self) -> dict:
        """What a cached response was drawn with (part of its key)."""
        return {"max_new_tokens": self.max_new_tokens, "max_length": self.max_length,
                "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}


def run_each(fn, items: list, concurrency: int, bar) -> None:
    """``fn(item)`` for every item, ``concurrency`` at a time (threads), the bar advanced as each
    ends; on an error or Ctrl-C the calls not started are cancelled and the error goes on."""
    if concurrency <= 1:
        for item in items:
            fn(item)
            bar.update(1)
        return
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [pool.submit(fn, item) for item in items]
        try:
            for future in as_completed(futures):
                future.result()
                bar.update(1)
        except BaseException:
            for f in futures:
                f.cancel()
            raise


class HFGenerator(_Sampling):
    """Greedy (or sampled) responses of a Hugging Face causal LM folder (an exported checkpoint).

    Its tokenizer is ``tokenizer`` (a loaded :class:`~megatron_rpo.data.tokenizer.Tokenizer`) or the
    folder's (a sentencepiece ``tokenizer.model`` or a Hugging Face tokenizer): the one training
    used; the prompt is encoded as preprocessing encodes it (one bos).
    """

    def __init__(self, model_dir: str, *, max_new_tokens: int, max_length: int, temperature: float = 0.0,
                 top_p: float = 1.0, batch_size: int = 8, seed: int = 0, device: str | None = None,
                 tokenizer=None):
        import torch
        from transformers import AutoModelForCausalLM

        from megatron_rpo.data.tokenizer import load_tokenizer

        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise InputError(f"{model_dir} is not a Hugging Face model folder (no config.json); export a trained "
                             "checkpoint with tools/convert_megatron_to_hf.py, or name the run's export/ folder")
        tokenizer_path = os.path.join(model_dir, "tokenizer.model")
        self.tokenizer = tokenizer or load_tokenizer(tokenizer_path if os.path.isfile(tokenizer_path) else model_dir)
        self.model_dir = model_dir
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
        self.model = self.model.to(self.device).eval()
        super().__init__(max_new_tokens, max_length, temperature, top_p, seed)
        self.batch_size = batch_size

    def _ids(self, item) -> list[int]:
        ids = self.tokenizer.encode(item.prompt)
        bos = self.tokenizer.bos_id
        return ([bos] if bos is not None and ids[:1] != [bos] else []) + ids

    def generate(self, items: list) -> list[str]:
        """The responses to ``items``, in order (batched by prompt length, left-padded)."""
        import torch

        out = [""] * len(items)
        ids = [self._ids(item) for item in items]
        order = sorted(range(len(items)), key=lambda k: len(ids[k]))
        eos = self.tokenizer.eos_id
        for start in range(0, len(order), self.batch_size):
            members = order[start: start + self.batch_size]
            rows = [ids[k] for k in members]
            width = max(map(len, rows))
            limits = [max(1, min(self.max_new_tokens, self.max_length - len(r))) for r in rows]
            tokens = torch.tensor([[eos] * (width - len(r)) + r for r in rows], device=self.device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
            options = dict(do_sample=self.temperature > 0, max_new_tokens=max(limits), eos_token_id=eos,
                           pad_token_id=eos)
            if self.temperature > 0:
                torch.manual_seed(self.seed + start)
                options.update(temperature=self.temperature, top_p=self.top_p)
            with torch.no_grad():
                generated = self.model.generate(tokens, attention_mask=mask, **options)[:, width:].tolist()
            for k, row, limit in zip(members, generated, limits):
                row = row[:limit]
                if eos in row:
                    row = row[: row.index(eos)]
                out[k] = self.tokenizer.decode(row).strip()
        return out


class EndpointGenerator(_Sampling):
    """Responses from an OpenAI-compatible endpoint's ``/completions`` (the prompt as text)."""

    def __init__(self, endpoint, *, max_new_tokens: int, max_length: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, concurrency: int = 8):
        super().__init__(max_new_tokens, max_length, temperature, top_p, seed)
        self.endpoint, self.concurrency = endpoint, concurrency

    def generate(self, items: list) -> list[str]:
        return [self.generate_one(item) for item in items]

    def generate_one(self, item) -> str:
        limit = max(1, min(self.max_new_tokens, self.max_length - item.prompt_tokens))
        return self.endpoint.complete(item.prompt, max_tokens=limit, temperature=self.temperature, top_p=self.top_p,
                                      seed=self.seed if self.temperature > 0 else None).strip()


def generation_key(model: str, generator, item) -> str:
    """What a cached response is for: the model's name, the sampling settings and the item."""
    return f"{model}:{_settings_digest(generator.settings)}:{item.id}"


def generate_missing(model: str, generator, items: list, store: Store, *, progress: bool = True) -> dict[str, str]:
    """Every item's response by item id: the cached ones, and the missing ones generated and kept
    one by one (a stop loses at most the batch or the calls in flight)."""
    missing = [item for item in items if generation_key(model, generator, item) not in store]
    bar = tqdm(total=len(items), initial=len(items) - len(missing), unit=" prompts", desc=f"generate {model}",
               disable=not progress, dynamic_ncols=True)
    try:
        if isinstance(generator, EndpointGenerator):
            def one(item):
                store.add(generation_key(model, generator, item),
                          {"model": model, "item": item.id, "response": generator.generate_one(item)})

            run_each(one, missing, generator.concurrency, bar)
        else:
            step = max(1, generator.batch_size)
            for start in range(0, len(missing), step):
                chunk = missing[start: start + step]
                for item, response in zip(chunk, generator.generate(chunk)):
                    store.add(generation_key(model, generator, item),
                              {"model": model, "item": item.id, "response": response})
                bar.update(len(chunk))
    finally:
        bar.close()
    return {item.id: store.get(generation_key(model, generator, item))["response"] for item in items}
