"""The fine-tuning axis: PEFT methods through ``peft``, one shared training loop, BoolQ with gold answers.

Typical use (see each module; ``studies/finetune.py`` does this for one run of ``params/peft.yaml``)::

    from efficientllm_utils.finetune import (DataSettings, MethodSettings, TrainSettings, build_boolq,
                                             build_method, load_base_model, train_model)
    settings = MethodSettings(rank=8, alpha=16, lr=1e-3)
    model = load_base_model("smollm2-135m-instruct", "lora", settings)
    data = build_boolq(tokenizer, DataSettings(max_length=112, n_heldout=48))
    built = build_method("lora", model, settings)
    result = train_model(built.model, built.param_groups, data.train, TrainSettings(steps=8, batch_size=4),
                         tokenizer.pad_token_id)
"""
from .config import (DATASETS, METHOD_NAMES, PAPER_DATASET_IDS, DataSettings, GloraSettings, MethodSettings,
                     TrainSettings)
from .data import Example, InstructionData, build_boolq, build_dataset, load_paper_sft, split_indices
from .methods import (METHODS, BuiltMethod, build_method, check_method, expected_lora_parameters,
                      load_base_model, trainable_parameters)
from .train import (StepRecord, TrainResult, batch_schedule, evaluate_heldout, load_adapter, mean_answer_loss,
                    save_adapter, threads, train_model)

__all__ = [
    "DATASETS", "METHOD_NAMES", "PAPER_DATASET_IDS", "DataSettings", "GloraSettings", "MethodSettings",
    "TrainSettings",
    "Example", "InstructionData", "build_boolq", "build_dataset", "load_paper_sft", "split_indices",
    "METHODS", "BuiltMethod", "build_method", "check_method", "expected_lora_parameters", "load_base_model",
    "trainable_parameters",
    "StepRecord", "TrainResult", "batch_schedule", "evaluate_heldout", "load_adapter", "mean_answer_loss",
    "save_adapter", "threads", "train_model",
]
