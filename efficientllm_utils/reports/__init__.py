"""What the book's chapter pages call, one module per study over the shared ``common`` module:

* ``common``: loading a study's results, tables for a page, ranks and Kendall's tau per model against the paper's
  leaderboard of the matching size group, the paper's figures and claims, the verdict rules, plots;
* ``quantization``; ``architecture`` (attention, positional encoding, MoE); ``finetune`` (PEFT).

None of them imports torch (except ``quantization``'s GGUF caveat, which asks ``models`` lazily).
"""
