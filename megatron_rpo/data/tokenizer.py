"""Tokenizers: a sentencepiece ``.model`` file (Llama-2, Mistral) or a Hugging Face tokenizer directory.

Both give token ids without special tokens from :meth:`Tokenizer.encode`; the preprocessing
adds ``bos`` before the prompt and ``eos`` after the response. Message lists are rendered with
the tokenizer's chat template when it has one, otherwise in the HH style
(``"\\n\\nHuman: ...\\n\\nAssistant: ..."``), which is what the bundled data uses.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

from megatron_rpo.errors import InputError

__all__ = ["Tokenizer", "load_tokenizer", "train_sentencepiece", "file_sha256", "tokenizer_sha256", "tokenizer_digests",
           "holds_tokenizer"]

_HF_TOKENIZER_FILES = {"tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                       "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja"}
_ROLE_NAMES = {"user": "Human", "human": "Human", "assistant": "Assistant", "system": "System"}


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Tokenizer:
    """A loaded tokenizer and what identifies it."""

    kind: str
    """``sentencepiece`` or ``huggingface``."""
    path: str
    """The ``.model`` file or the tokenizer directory."""
    vocab_size: int
    """Number of token ids."""
    bos_id: int | None
    """Begin-of-sequence id, or None if the tokenizer has none."""
    eos_id: int
    """End-of-sequence id."""
    sha256: str
    """Hash of the tokenizer's files: datasets record it, training checks it."""
    _impl: Any = field(repr=False, default=None)
    chat_template: str | None = None
    """A Jinja chat template that replaces the tokenizer's own (``--chat-template FILE``)."""

    @property
    def _own_template(self) -> bool:
        return self.kind == "huggingface" and bool(getattr(self._impl, "chat_template", None))

    @property
    def chat_rendering(self) -> str:
        """How message lists become text: ``template`` (a chat template) or ``hh`` (HH style)."""
        return "template" if self.chat_template or self._own_template else "hh"

    def _special(self, token_id: int | None) -> str:
        # A sentencepiece model reads "<s>" in text as three characters, not as the token: the
        # template gets "" and the preprocessing adds the one bos (before the prompt) and the
        # eos (after the response) as ids. A Hugging Face tokenizer reads its special tokens.
        if token_id is None or self.kind == "sentencepiece":
            return ""
        return self._impl.convert_ids_to_tokens(token_id)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no special tokens added."""
        if self.kind == "sentencepiece":
            return self._impl.encode(text, out_type=int)
        return self._impl.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self._impl.decode(ids)

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """A message list as text: the chat template if there is one, HH style otherwise."""
        if self.chat_template:
            import jinja2

            template = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(self.chat_template)
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   bos_token=self._special(self.bos_id), eos_token=self._special(self.eos_id))
        if self._own_template:
            return self._impl.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        text = "".join(f"\n\n{_ROLE_NAMES.get(m['role'], m['role'].title())}: {m['content']}" for m in messages)
        return text + ("\n\nAssistant:" if add_generation_prompt else "")

    def use_chat_template(self, path: str) -> None:
        """Render message lists with the Jinja chat template in the file ``path`` (``--chat-template``).

        Raises:
            InputError: the file cannot be read.
        """
        try:
            with open(path) as f:
                self.chat_template = f.read()
        except OSError as e:
            raise InputError(f"cannot read the chat template {path}: {e.strerror}") from None

    def identity(self) -> dict:
        """What a manifest records about the tokenizer."""
        return {"kind": self.kind, "path": os.path.abspath(self.path), "vocab_size": self.vocab_size,
                "sha256": self.sha256}


def load_tokenizer(path: str) -> Tokenizer:
    """Load a sentencepiece model file or a Hugging Face tokenizer directory.

    Raises:
        ValueError: the path does not exist or is neither kind.
    """
    if os.path.isfile(path):
        import sentencepiece as spm

        try:
            sp = spm.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:
            raise InputError(f"{path}: not a sentencepiece model file: {e}") from e
        bos = sp.bos_id()
        return Tokenizer("sentencepiece", path, sp.get_piece_size(), bos if bos >= 0 else None, sp.eos_id(),
                         file_sha256(path), sp)
    if os.path.isdir(path):
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: not a Hugging Face tokenizer directory: {e}") from e
        if tok.eos_token_id is None:
            raise InputError(f"{path}: the tokenizer has no eos token")
        return Tokenizer("huggingface", path, len(tok), tok.bos_token_id, tok.eos_token_id, tokenizer_sha256(path), tok)
    raise InputError(f"tokenizer {path!r} does not exist (expected a sentencepiece .model file or a directory)")


def tokenizer_sha256(path: str) -> str:
    """What ``load_tokenizer(path).sha256`` is, without loading it: the sentencepiece file's sha256,
    or for a Hugging Face directory the sha256 over its tokenizer files' names and hashes."""
    if os.path.isfile(path):
        return file_sha256(path)
    digest = hashlib.sha256()
    for name in sorted(set(os.listdir(path)) & _HF_TOKENIZER_FILES):
        digest.update(name.encode())
        digest.update(file_sha256(os.path.join(path, name)).encode())
    return digest.hexdigest()


def holds_tokenizer(directory: str) -> bool:
    """Whether ``directory`` holds any tokenizer file (a Hugging Face tokenizer's or a sentencepiece model)."""
    return os.path.isdir(directory) and bool(set(os.listdir(directory)) & _HF_TOKENIZER_FILES)


def tokenizer_digests(directory: str) -> set[str]:
    """The ``sha256`` values a dataset tokenised with the tokenizer in ``directory`` records: the
    directory's (as a Hugging Face tokenizer) and its ``tokenizer.model``'s (as sentencepiece).
    Empty when the directory holds no tokenizer file (a checkpoint converted without one)."""
    if not holds_tokenizer(directory):
        return set()
    digests = {tokenizer_sha256(directory)}
    if os.path.isfile(os.path.join(directory, "tokenizer.model")):
        digests.add(file_sha256(os.path.join(directory, "tokenizer.model")))
    return digests


def check_tokenized_for(prefix: str, manifest: dict, checkpoint: str) -> None:
    """Refuse the dataset ``prefix`` (its ``manifest``) unless it was tokenised with the tokenizer
    the converted ``checkpoint`` carries (a checkpoint that carries none is not checked).

    Raises:
        ValueError: naming both tokenizers and the fix.
    """
    carried = tokenizer_digests(os.path.join(checkpoint, "tokenizer"))
    if carried and manifest["tokenizer"]["sha256"] not in carried:
        raise InputError(f"{prefix} was tokenised with {manifest['tokenizer']['path']}, not with the "
                         f"tokenizer {checkpoint} carries ({os.path.join(checkpoint, 'tokenizer')}): the "
                         "token ids would mean other words to the model; preprocess the data again with "
                         "--tokenizer pointing there")


def train_sentencepiece(texts, model_prefix: str, vocab_size: int = 1000) -> str:
    """Train a small Llama-style (BPE, byte fallback, bos=1/eos=2) sentencepiece model on ``texts``.

    For the quickstart and the tests, which need a real tokenizer and may download nothing.
    Returns the ``.model`` path.
    """
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        # As Llama's tokenizer: text round-trips, spaces and all.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        minloglevel=2,
    )
    return f"{model_prefix}.model"
