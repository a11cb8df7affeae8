"""The cost model of speculative decoding, from measurements kept as data (speculative/costs.json).

Every cost is in one-token decode steps of the target model in the same mode. The numbers were measured
on one machine (costs.json says which and how); they steer the adaptive draft length and are never timed
at run time, so a seeded run is reproducible.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

import torch
from torch import nn

from ..models.base import DecoderModel


@lru_cache(maxsize=1)
def table() -> dict[str, Any]:
    return json.loads(resources.files("leanformers.speculative").joinpath("costs.json").read_text(encoding="utf-8"))


def default_verify_rows(weight_kind: str) -> int:
    """Tokens per compiled CPU verification: where extra rows stop being nearly free for this weight kind."""
    return table()["compiled_verify_rows"][weight_kind]


def compiled_verify_cost(weight_kind: str, rows: int) -> float:
    """A compiled CPU verification over `rows` tokens (linear between and beyond the measured sizes)."""
    points = {int(k): v for k, v in table()["compiled_verify"][weight_kind].items()}
    if rows in points:
        return points[rows]
    ts = sorted(points)
    lo = max([t for t in ts if t < rows], default=ts[0])
    hi = min([t for t in ts if t > rows], default=None)
    if hi is None:  # beyond the table: the last slope
        lo, hi = ts[-2], ts[-1]
    return points[lo] + (rows - lo) * (points[hi] - points[lo]) / (hi - lo)


def eager_verify_cost(weight_kind: str, device: torch.device, compiled_steps: bool) -> tuple[float, float]:
    """(fixed, per_token): an eager forward over k+1 tokens costs 1 + fixed + k * per_token steps.

    compiled_steps: the one-token steps it is compared with are compiled CPU steps (a few times faster).
    """
    t = table()
    if device.type != "cpu":
        c = t["eager_verify"]["accelerator"]
        return c["fixed"], c["per_token"]
    c = t["eager_verify"][weight_kind]
    fixed, per_token = c["fixed"], c["per_token"]
    if compiled_steps:
        s = t["compiled_cpu_step_speedup"]
        return (1 + fixed) * s - 1, per_token * s
    return fixed, per_token


def eager_float32_padding() -> tuple[int, dict[int, float]]:
    """(rows, cost by rows): eager float32 forwards of 2-4 tokens are slower than of `rows` on CPU, so pad."""
    p = table()["eager_float32_padding"]
    return p["rows"], {int(k): v for k, v in p["cost"].items()}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (shared storages once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type == "meta":
            continue
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def step_time(model: DecoderModel, compiled: bool) -> float:
    """A modelled (not measured) one-token step time on CPU: weights streamed at a fixed rate plus per-layer work."""
    c = table()["step_time"]["compiled" if compiled else "eager"]
    return weight_bytes(model) / c["bytes_per_s"] + model.kv_layout().n_layers * c["seconds_per_layer"]
