"""The offline English corpus, its held-out split, the shared tokenizer and the token blocks."""
from __future__ import annotations

import itertools

import pytest
import torch

from efficientllm_utils import text_data


def test_wiki_markup_is_stripped():
    markup = ("{{Infobox|name={{nested}}}}'''Albedo''' is the [[diffuse reflection|reflected]] fraction of "
              "[[sunlight]].<ref>{{cite web|url=x}}</ref>\n== History ==\n* item\n"
              "[[File:a.png|thumb|a [[map]]]]\n{| class=wikitable\n|-\n| cell\n|}\n"
              "[http://example.org an example]&nbsp;<!-- hidden -->")
    assert text_data.wiki_to_text(markup) == ("Albedo is the reflected fraction of sunlight.\nHistory\nitem\n\n"
                                              "an example")


def test_tokenizer_training_is_deterministic():
    texts = ["It was the best of times, it was the worst of times."] * 20 + ["To be, or not to be."] * 10
    first, second = text_data.train_tokenizer(texts, 300), text_data.train_tokenizer(texts, 300)
    assert first.to_str() == second.to_str()
    assert first.token_to_id(text_data.END_OF_TEXT) == 0
    assert first.decode(first.encode("naïve café").ids) == "naïve café"  # byte-level: no unknown tokens


def test_split_is_by_document_seeded_and_covers_every_source():
    documents = tuple(text_data.Document(source, f"{source}-{i}", f"text {i}")
                      for source in ("a", "b") for i in range(40))
    split = text_data.split_documents(documents, heldout_fraction=0.1, seed=0)
    assert split == text_data.split_documents(documents, heldout_fraction=0.1, seed=0)
    assert split != text_data.split_documents(documents, heldout_fraction=0.1, seed=1)
    assert {d.source for d in split["heldout"]} == {"a", "b"} and len(split["heldout"]) == 8
    assert set(split["train"]).isdisjoint(split["heldout"]) and len(split["train"]) + 8 == 80


def test_real_corpus_tokenizer_and_blocks():
    split = text_data.split_documents()
    assert {d.source for d in split["heldout"]} == {"shakespeare", "wikipedia", "lee-news"}
    assert not {d.title for d in split["train"]} & {d.title for d in split["heldout"]}
    tokenizer = text_data.load_tokenizer(8192)
    assert len(tokenizer) == 8192 and tokenizer.eos_token == text_data.END_OF_TEXT
    assert tokenizer.decode(tokenizer("Wherefore art thou Romeo?")["input_ids"]) == "Wherefore art thou Romeo?"

    first = list(itertools.islice(text_data.token_blocks("train", 64, 4, seed=0), 3))
    again = list(itertools.islice(text_data.token_blocks("train", 64, 4, seed=0), 3))
    other = next(text_data.token_blocks("train", 64, 4, seed=1))
    assert all(b.shape == (4, 64) and b.dtype == torch.int64 for b in first)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True)) and not torch.equal(first[0], other)
    heldout = list(text_data.token_blocks("heldout", 512, 8, shuffle=False))
    stream = torch.from_numpy(text_data.token_ids("heldout")).long()
    assert torch.equal(heldout[0][0], stream[:512]) and len(heldout) == len(stream) // 512 // 8
    assert int(stream.max()) < 8192
    with pytest.raises(ValueError, match="split"):
        text_data.token_ids("validation")
