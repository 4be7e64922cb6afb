"""Tokenizers: load a `tokenizer.json` (local or S3) or train a byte-level BPE on a text sample."""
from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from app import storage

EOT = "<|endoftext|>"


def load_tokenizer(path: str) -> Tokenizer:
    """A tokenizer from a `tokenizer.json` file; a clear error if missing or not a tokenizer."""
    try:
        return Tokenizer.from_str(storage.read_text(path))
    except FileNotFoundError:
        raise ValueError(f"tokenizer file not found: {path}") from None
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise ValueError(f"{path} is not a tokenizer.json: {e}") from None


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE (GPT-2 style) with `<|endoftext|>` as its first id; deterministic."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def train_chars(texts: Iterable[str]) -> Tokenizer:
    """A character-level tokenizer (nanoGPT's shakespeare_char): one id per distinct character of `texts`
    in sorted order, after `<|endoftext|>` = 0. Characters not seen become `[UNK]` (the last id)."""
    chars = sorted(set().union(*(set(t) for t in texts)))
    vocab = {EOT: 0, **{c: i + 1 for i, c in enumerate(chars)}, "[UNK]": len(chars) + 1}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tok.add_special_tokens([EOT])
    tok.decoder = decoders.Fuse()
    return tok


def eot_id(tok: Tokenizer) -> int:
    i = tok.token_to_id(EOT)
    if i is None:
        raise ValueError(f"the tokenizer has no {EOT} token: add it, or let spotlm train a BPE")
    return i


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def tokenizer_sha256(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()
