"""The fine-tuning axis: PEFT methods through ``peft``, one shared training loop, BoolQ with gold answers.

Typical use (see each module)::

    from efficientllm_utils.finetune import profile, load_base_model, build_method, build_boolq, train_model
    prof = profile("cpu")
    settings = prof.settings_for("lora")
    model = load_base_model(prof.model, "lora", settings)
    data = build_boolq(tokenizer, prof.data)
    built = build_method("lora", model, settings)
    result = train_model(built.model, built.param_groups, data.train, prof.train, tokenizer.pad_token_id)
"""
from .config import (METHOD_NAMES, PROFILES, DataSettings, FinetuneProfile, MethodSettings, TrainSettings,
                     profile)
from .data import Example, InstructionData, build_boolq, build_dataset, load_paper_sft, split_indices
from .methods import (METHODS, BuiltMethod, build_method, check_method, expected_lora_parameters,
                      load_base_model, trainable_parameters)
from .train import (StepRecord, TrainResult, batch_schedule, evaluate_heldout, load_adapter, mean_answer_loss,
                    save_adapter, train_model)

__all__ = [
    "METHOD_NAMES", "PROFILES", "DataSettings", "FinetuneProfile", "MethodSettings", "TrainSettings", "profile",
    "Example", "InstructionData", "build_boolq", "build_dataset", "load_paper_sft", "split_indices",
    "METHODS", "BuiltMethod", "build_method", "check_method", "expected_lora_parameters", "load_base_model",
    "trainable_parameters",
    "StepRecord", "TrainResult", "batch_schedule", "evaluate_heldout", "load_adapter", "mean_answer_loss",
    "save_adapter", "train_model",
]
