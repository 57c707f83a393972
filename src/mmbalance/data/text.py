"""Text -> token ids for datasets with a text modality (kind ``tokens``: (L,) int64 ids, 0 = padding).

Tokenisation happens in the dataset, once for the whole split (the fast tokenizer works on a list of
strings in Rust), so the model only ever sees fixed-length id tensors and the pretrained encoder
(``mmbalance.models.pretrained.TextTransformerEncoder``) rebuilds the attention mask from ``ids != 0``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mmbalance.errors import UserError

__all__ = ["Tokenizer", "clean_text"]

_RT = re.compile(r"^\s*RT\b[\s:]*")
_URL = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
_SPACES = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """BalanceBenchmark's FOOD-101 text cleaning: drop a leading "RT", URLs and every '#', then collapse
    whitespace. (Their tweet-style URL pattern also drops whatever follows a link on the same line; here
    only the link itself goes, since a recipe title may go on after it.)"""
    text = _RT.sub("", str(text))
    text = _URL.sub(" ", text)
    text = text.replace("#", "")
    return _SPACES.sub(" ", text).strip()


class Tokenizer:
    """A Hugging Face fast tokenizer, loaded from local files only: texts -> (N, max_length) int64 ids
    (``model_or_path`` and the ids: docs/datasets.md, "Tokenisation"). Padding is id 0 in the stored ids: for a
    tokenizer whose padding id is not 0 (RoBERTa's 1) the two ids are swapped, and ``TextTransformerEncoder`` swaps
    them back with its model's padding id."""

    def __init__(self, model_or_path: str = "bert-base-uncased", max_length: int = 40):
        if int(max_length) < 2:
            raise UserError(f"Tokenizer: max_length must be >= 2 (room for [CLS] and [SEP]), got {max_length}")
        self.name = str(model_or_path)
        self.max_length = int(max_length)
        self._tok = _load_tokenizer(self.name)
        pad = self._tok.pad_token_id
        if pad is None:
            raise UserError(f"Tokenizer: {self.name!r} has no padding token; use a BERT-style tokenizer")
        self.pad_id = int(pad)

    @property
    def fingerprint(self) -> str:
        """A hash of the tokenizer's definition and max_length: a cache of ids is valid iff it matches."""
        backend = getattr(self._tok, "backend_tokenizer", None)
        spec = backend.to_str() if backend is not None else json.dumps(sorted(self._tok.get_vocab().items()))
        return hashlib.sha1(f"{spec}|{self.max_length}|{self.pad_id}".encode()).hexdigest()

    def __call__(self, texts: Sequence[str], chunk: int = 8192) -> np.ndarray:
        """(N, max_length) int64 ids for N texts, padding = 0."""
        out = np.zeros((len(texts), self.max_length), dtype=np.int64)
        for start in range(0, len(texts), chunk):  # bounded memory for the Python lists transformers returns
            part = [str(t) for t in texts[start:start + chunk]]
            enc = self._tok(part, padding="max_length", max_length=self.max_length, truncation=True,
                            return_attention_mask=False, return_token_type_ids=False)
            out[start:start + len(part)] = np.asarray(enc["input_ids"], dtype=np.int64)
        if self.pad_id != 0:
            is_pad, is_zero = out == self.pad_id, out == 0
            out[is_pad], out[is_zero] = 0, self.pad_id
        return out

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, max_length={self.max_length})"


def _load_tokenizer(name: str):
    """A fast tokenizer from a WordPiece vocab.txt, a local folder or the local hub cache; never downloads."""
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise UserError(f"Tokenizer needs the transformers package ({exc})") from exc
    from mmbalance.paths import from_pretrained_offline, text_model_source

    source = text_model_source(name)
    if source.path.is_file():  # a bare vocab.txt: transformers only loads folders and hub names
        return _wordpiece_tokenizer(source.path)
    return from_pretrained_offline(
        source, transformers.AutoTokenizer.from_pretrained, {"use_fast": True},
        who="Tokenizer", what="tokenizer", folder_holds="tokenizer.json or vocab.txt (with tokenizer_config.json)",
        local_forms="a local tokenizer folder or a WordPiece vocab.txt",
    )


def _wordpiece_tokenizer(path: Path):
    """An uncased-BERT-style fast tokenizer over a bare WordPiece vocab.txt (one token per line)."""
    import transformers  # already loaded by _load_tokenizer

    if path.suffix != ".txt":
        raise UserError(f"Tokenizer: {str(path)!r} is a file but not a WordPiece vocab.txt; give a tokenizer "
                        "folder, a vocab.txt, or a hub name in the Hugging Face cache")
    cls = getattr(transformers, "BertTokenizerFast", None) or transformers.BertTokenizer
    try:
        if "vocab_file" in inspect.signature(cls.__init__).parameters:  # transformers 4
            return cls(vocab_file=str(path), do_lower_case=True)
        # transformers 5 takes the vocabulary as a {token: id} dict: one token per line, id = line number
        with path.open(encoding="utf-8") as f:
            vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
        return cls(vocab=vocab, do_lower_case=True)
    except Exception as exc:
        raise UserError(f"Tokenizer: cannot read the WordPiece vocabulary {path}: {exc}") from exc
