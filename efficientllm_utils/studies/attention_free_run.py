"""The attention-free study's run model (``studies/attention_free.py``)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..arch.attention_free import ARCHITECTURES, hf_config
from ..arch.attention_free import PAPER_SHAPES as AF_PAPER_SHAPES
from .architecture_run import PretrainRun

class AttentionFreeRun(PretrainRun):
    """One model of the attention-free study: our transformer, or an attention-free model (Mamba, RWKV) or
    Pythia from ``transformers``, pretrained and decoded exactly like the other architecture studies' runs.

    ``architecture: transformer`` reads the ``PretrainRun`` shape fields; the others read ``hidden_size`` and
    ``n_layers`` (Pythia also ``n_heads``; Pythia and RWKV ``intermediate_size``, None: 4 x hidden), or, with
    ``size``, the paper's Table 6 shape of that size group (``arch.attention_free.PAPER_SHAPES``).
    """

    architecture: Literal[ARCHITECTURES] = "transformer"  # type: ignore[valid-type]
    state_size: int = Field(16, ge=1)  # Mamba's SSM state per channel (N)
    conv_kernel: int = Field(4, ge=2)  # Mamba's causal convolution width
    expand: int = Field(2, ge=1)  # Mamba's inner width / hidden
    use_mambapy: bool = True  # Mamba trains with mambapy's parallel scan (plain torch), not a Python loop per token
    num_threads: int | None = Field(None, ge=1)  # torch intra-op threads for the whole run (None: torch's setting)

    def _check_shape(self) -> None:
        if self.architecture == "transformer":
            return super()._check_shape()
        if self.nproc > 1:
            raise ValueError(f"nproc={self.nproc}: architecture {self.architecture!r} trains in one process; "
                             "nproc > 1 is for architecture 'transformer' (our decoder)")
        if self.size is None:
            needed = ("hidden_size", "n_layers") + (("n_heads",) if self.architecture == "pythia" else ())
            missing = [f for f in needed if getattr(self, f) is None]
            if missing:
                raise ValueError(f"architecture {self.architecture!r}: give either size (one of "
                                 f"{list(AF_PAPER_SHAPES[self.architecture])}) or {missing}")
        self.hf_config()

    def af_shape(self) -> dict[str, int | None]:
        """hidden_size, n_layers, n_heads, intermediate_size of an attention-free model (or Pythia)."""
        if self.size is not None:
            shape = dict(AF_PAPER_SHAPES[self.architecture][self.size])
            return {"n_heads": None, "intermediate_size": None, **shape}
        return {"hidden_size": self.hidden_size, "n_layers": self.n_layers, "n_heads": self.n_heads,
                "intermediate_size": self.intermediate_size}

    def hf_config(self):
        """The ``transformers`` config of this run's attention-free model (or Pythia); not for the transformer."""
        if self.architecture == "transformer":
            raise ValueError("architecture 'transformer' is our decoder: use decoder_config()")
        return hf_config(self.architecture, vocab_size=self.vocab_size, max_context=self.max_context,
                         state_size=self.state_size, conv_kernel=self.conv_kernel, expand=self.expand,
                         use_mambapy=self.use_mambapy, **self.af_shape())
