"""Per-task output operations (`postprocess:`), applied to final values: after blending (crop
mode: after the crop; overlap mode: where a value is final — a task's exclusive box, the blend
stage's summed bands), after the mask, before the output dtype. Final values only: an op need
not be linear (max, min), so overlap mode's partial sums stay in the model's channels.

An op is one class: a pydantic model of its parameters (its `op` is its name), `out_channels`
(refuses parameters that do not fit the channels it gets, naming the parameter) and `apply`.
`OPS` is the registry the config's `postprocess` list is validated against, by `op`.
No torch import here (the config imports this module); `apply` gets a tensor on the device.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch


class OpError(ValueError):
    """Parameters that do not fit the channels the op gets; `param` names the parameter."""

    def __init__(self, param: str, message: str):
        self.param, self.message = param, message
        super().__init__(f"{param}: {message}")


class PostOp(BaseModel):
    """One postprocess operation; subclasses add `op: Literal[name]` and their parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def out_channels(self, channels: int) -> int:
        """Channels out for `channels` in; raises `OpError` if the parameters do not fit."""
        raise NotImplementedError

    def apply(self, values: "torch.Tensor") -> "torch.Tensor":
        """(c, z, y, x) float32 -> (out_channels(c), z, y, x) float32, on the same device."""
        raise NotImplementedError


class Channels(PostOp):
    """Select channels and optionally reduce them to one (affinities -> a boundary map)."""

    op: Literal["channels"]
    select: Optional[Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]] = Field(
        None, description="Channel indices to keep, in this order, each once. Default: all.")
    reduce: Optional[Literal["mean", "max", "min"]] = Field(
        None, description="Reduce the selected channels to one voxel-wise. Default: none "
        "(keep the selected channels).")

    def out_channels(self, channels: int) -> int:
        for i in self.select or ():
            if i >= channels:
                raise OpError("select", f"index {i} out of range for {channels} channel(s)")
        if self.select and len(set(self.select)) < len(self.select):
            raise OpError("select", f"{self.select} lists a channel twice")
        return 1 if self.reduce else len(self.select or range(channels))

    def apply(self, values: "torch.Tensor") -> "torch.Tensor":
        if self.select is not None and self.select != list(range(values.shape[0])):
            values = values[self.select]
        if self.reduce is None:
            return values
        return {"mean": values.mean, "max": values.amax, "min": values.amin}[self.reduce](
            0, keepdim=True)


OPS: dict[str, type[PostOp]] = {"channels": Channels}
