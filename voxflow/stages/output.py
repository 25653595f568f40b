"""How final values become what the output layer stores: the `postprocess` ops in order,
then the output dtype, on the device (less to copy back)."""
from __future__ import annotations

import torch

from ..config import RunConfig


def to_output_dtype(prob: torch.Tensor, dtype: str) -> torch.Tensor:
    """float32 probabilities -> the output dtype, on the device (less to copy back)."""
    if dtype == "uint8":
        return (prob.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return prob.to(getattr(torch, dtype))


def to_output(values: torch.Tensor, cfg: RunConfig) -> torch.Tensor:
    """Final values (c, z, y, x: blended, normalised, masked) -> what the output layer
    stores: the `postprocess` ops in order, then the output dtype. The one place both
    happen, wherever a value becomes final (crop, overlap's exclusive box, the blends)."""
    for op in cfg.postprocess:
        values = op.apply(values)
    return to_output_dtype(values, cfg.output_dtype)
