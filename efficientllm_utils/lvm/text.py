"""Tokenizers built locally: a word-level vocabulary over the captions, no hub.

The pipelines only call a tokenizer (``padding="max_length"``, ``truncation``,
``return_tensors="pt"``) and read ``input_ids`` and ``model_max_length``, so a
``PreTrainedTokenizerFast`` over a ``tokenizers`` WordLevel model serves for
CLIP, T5 and UMT5 alike. Captions are lower-case words; anything else maps to ``<unk>``.
"""
from __future__ import annotations

import re

SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
PAD, UNK, BOS, EOS = range(4)


def words(texts) -> list[str]:
    return sorted({w for t in texts for w in re.findall(r"[a-z0-9]+", t.lower())})


def word_tokenizer(texts, max_length: int, add_bos: bool = False):
    """A fast tokenizer whose vocabulary is the specials then every word of ``texts``; sequences end with
    ``<eos>`` (and start with ``<bos>`` when ``add_bos``, as CLIP's do)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate((*SPECIALS, *words(texts)))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    single = ("<bos> " if add_bos else "") + "$A <eos>"
    core.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("<bos>", BOS), ("<eos>", EOS)])
    return PreTrainedTokenizerFast(tokenizer_object=core, model_max_length=max_length, pad_token="<pad>",
                                   unk_token="<unk>", bos_token="<bos>", eos_token="<eos>")
