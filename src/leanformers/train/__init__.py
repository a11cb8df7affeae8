"""Fine-tuning: full, LoRA and QLoRA on one process (data -> loop -> checkpoints -> HF / PEFT directories).

    import leanformers
    result = leanformers.finetune("smollm2-135m-instruct", data="train.jsonl", output_dir="out/", method="lora")

Modules: args (options), data (formats, packing, order), lora (LoRA / QLoRA, PEFT files, merge),
loss (the model call and chunked cross-entropy), optim (AdamW, schedules, precision), loop, checkpoint,
export (Hugging Face directories), run (one run's directory, preparation, outputs), api (finetune()).
"""

from .api import FinetuneResult, finetune
from .args import FinetuneArgs
from .data import DataError
from .loop import TrainingError

__all__ = ["finetune", "FinetuneResult", "FinetuneArgs", "DataError", "TrainingError"]
