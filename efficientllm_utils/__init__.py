"""EfficientLLM, reproduced: the tested package behind the study's notebooks and book."""
import logging as _logging

# Import-time noise of optional libraries, not a finding: torchao (imported by transformers' quantizers whenever it is
# installed) logs each optional CUDA extension it cannot load on a CPU machine, and registers its enums with
# torch.compile through a deprecated call that torch logs. Errors still show.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
