"""Fine-tuning options: one dataclass shared by `leanformers.finetune(...)` and `leanformers finetune ...`.

Every keyword is a CLI flag with `_` -> `-` (`lora_r` -> `--lora-r`). `check()` validates them all before
any model is loaded, with messages that name the option.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import InvalidArgumentError

METHODS = ("full", "lora", "qlora")
PRECISIONS = ("auto", "fp32", "bf16-mixed", "fp16-mixed", "bf16-true")
SCHEDULES = ("cosine", "linear", "constant")
LOGGERS = ("none", "tensorboard")
DEFAULT_LR = {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4}

# Options a resumed run may change; every other one must equal the checkpoint's (see check_resumable).
RESUME_MAY_CHANGE = ("output_dir", "resume", "overwrite", "save_every", "eval_every", "save_total_limit", "log",
                     "progress", "callback", "eval_data", "device")


@dataclass
class FinetuneArgs:
    model: str
    data: str
    output_dir: str
    eval_data: str | None = None
    method: str = "lora"
    lora_r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    quantize: str | None = None  # qlora: int8 | int4 (default int4)
    epochs: float | None = None  # default 1 when max_steps is not given
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None  # default DEFAULT_LR[method]
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "cosine"
    max_grad_norm: float | None = 1.0
    seq_len: int = 1024
    packing: bool = False
    truncate: bool = True  # False: refuse examples longer than seq_len (--no-truncate)
    precision: str = "auto"  # auto: bf16-mixed on a GPU with bf16 and for qlora, else fp32
    grad_checkpointing: bool = False
    save_every: int | None = 500
    save_total_limit: int | None = None
    eval_every: int | None = None
    seed: int = 42
    resume: bool | str = False
    overwrite: bool = False
    log: str = "none"
    device: str = "cpu"
    progress: bool | None = None  # tqdm bar (default: when stderr is a terminal)
    # called after every optimizer step with that step's metrics (the metrics.jsonl row), before any checkpoint
    callback: Callable[[dict[str, Any]], None] | None = None

    # ------------------------------------------------------------------------------ validation
    def check(self) -> "FinetuneArgs":
        """Validate every option (raises InvalidArgumentError naming it); fills method-dependent defaults."""

        def bad(name: str, expected: str) -> InvalidArgumentError:
            flag = "--" + name.replace("_", "-")
            return InvalidArgumentError(f"{name} ({flag}) must be {expected}, got {getattr(self, name)!r}")

        def pos_int(name: str, *, optional: bool = False, zero: bool = False) -> None:
            v = getattr(self, name)
            if v is None and optional:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if zero else 1):
                raise bad(name, "a non-negative integer" if zero else "a positive integer")

        def number(name: str, *, lo: float = 0.0, lo_open: bool = False, hi: float | None = None,
                   optional: bool = False) -> None:
            v = getattr(self, name)
            if v is None and optional:
                return
            ok = (not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
                  and (v > lo if lo_open else v >= lo) and (hi is None or v < hi))
            if not ok:
                rng = f"{'>' if lo_open else '>='} {lo}" + (f" and < {hi}" if hi is not None else "")
                raise bad(name, f"a number {rng}")

        for name in ("model", "data", "output_dir"):
            if not isinstance(getattr(self, name), (str, Path)) or not str(getattr(self, name)).strip():
                raise bad(name, "a non-empty path or name")
        if self.method not in METHODS:
            raise bad("method", f"one of {', '.join(METHODS)}")
        if self.precision not in PRECISIONS:
            raise bad("precision", f"one of {', '.join(PRECISIONS)}")
        if self.lr_schedule not in SCHEDULES:
            raise bad("lr_schedule", f"one of {', '.join(SCHEDULES)}")
        if self.log not in LOGGERS:
            raise bad("log", f"one of {', '.join(LOGGERS)}")
        pos_int("lora_r")
        number("lora_alpha", lo_open=True)
        number("lora_dropout", hi=1.0)
        tm = self.target_modules
        if not (isinstance(tm, str) and tm.strip()) and not (
                isinstance(tm, (list, tuple)) and tm and all(isinstance(t, str) and t for t in tm)):
            raise bad("target_modules", "'all-linear' or module names (e.g. q_proj,v_proj)")
        if self.quantize is not None and self.quantize not in ("int8", "int4"):
            raise bad("quantize", "int8 or int4")
        if self.method == "qlora" and self.quantize is None:
            self.quantize = "int4"
        if self.method != "qlora" and self.quantize is not None:
            raise InvalidArgumentError(f"quantize ({self.quantize}) trains LoRA over a frozen quantized base: "
                                       "use method='qlora' (--method qlora)")
        if self.max_steps is None and self.epochs is None:
            self.epochs = 1
        pos_int("max_steps", optional=True)
        number("epochs", lo_open=True, optional=True)
        pos_int("batch_size")
        pos_int("grad_accum")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.method]
        number("lr", lo_open=True)
        number("weight_decay")
        pos_int("warmup_steps", zero=True)
        number("max_grad_norm", lo_open=True, optional=True)
        pos_int("seq_len")
        if self.seq_len < 2:
            raise bad("seq_len", "at least 2")
        pos_int("save_every", optional=True)
        pos_int("save_total_limit", optional=True)
        pos_int("eval_every", optional=True)
        if self.eval_every is not None and self.eval_data is None:
            raise InvalidArgumentError("eval_every (--eval-every) needs eval_data (--eval-data)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise bad("seed", "a non-negative integer")
        if not isinstance(self.resume, (bool, str, Path)):
            raise bad("resume", "True/False or a checkpoint directory")
        if self.resume and self.overwrite:
            raise InvalidArgumentError("resume (--resume) and overwrite (--overwrite) exclude each other")
        for name in ("packing", "truncate", "grad_checkpointing", "overwrite"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "True or False")
        if self.callback is not None and not callable(self.callback):
            raise bad("callback", "a callable taking the step's metrics dict")
        if self.log == "tensorboard":
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                raise InvalidArgumentError("log='tensorboard' (--log tensorboard) needs the tensorboard package: "
                                           "pip install tensorboard") from None
        return self

    def resolved_precision(self, device_type: str, bf16_ok: bool) -> str:
        """The precision to run: 'auto' picks bf16-mixed on a GPU with bf16, else fp32; fp16-mixed needs CUDA."""
        if self.precision == "auto":  # QLoRA's base computes in bfloat16 anyway: its LoRA math follows
            return "bf16-mixed" if bf16_ok and (device_type == "cuda" or self.method == "qlora") else "fp32"
        if self.precision == "fp16-mixed" and device_type != "cuda":
            raise InvalidArgumentError(
                f"precision fp16-mixed (--precision fp16-mixed) needs a CUDA device (float16 autocast with a "
                f"gradient scaler); on {device_type} use bf16-mixed, bf16-true or fp32")
        return self.precision

    def to_json(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "callback":
                continue
            out[f.name] = str(v) if isinstance(v, Path) else v
        return out


def check_resumable(saved: dict[str, Any], current: FinetuneArgs, where: str) -> None:
    """Refuse a resume whose options change the run (data order, model, optimizer, schedule)."""
    now = current.to_json()
    diffs = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in now
             if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != now[k]]
    if diffs:
        raise InvalidArgumentError(f"{where}: the checkpoint was made with other options, so it cannot be resumed "
                                   f"exactly ({'; '.join(diffs)}); use the original options or --overwrite")
