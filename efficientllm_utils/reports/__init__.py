"""What the book's chapter pages call, computed from the records, one module per concern (none imports torch, except
``quantization``'s GGUF caveat, which asks ``models`` lazily):

* ``load``: a study's results (records and their flat table, the profile a page shows);
* ``display``: tables for a page (units, no index, readable numbers), how each metric was obtained, trade-off plots;
* ``paper``: the paper's figures, claims and leaderboard ranks shipped in ``book/paper/``;
* ``leaderboard``: our ranks per model beside the paper's of the matching size group, Kendall's tau;
* ``verdicts``: the intervals of differences between runs and the verdict rules;
* ``findings``: the paper's claims decided on a chapter's records, and the caveats the records show;

then one module per study: ``quantization``; ``architecture`` (attention, positional encoding, MoE);
``attention_free``; ``finetune`` (PEFT); ``dit``; ``vlm``; ``lvm``; and ``roofline``, the LLM chapters' section
against the machine's limits.
"""
