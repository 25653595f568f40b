"""Task messages: small versioned JSON documents, never code.

A message names a run, a stage and a task index, and carries the task's box for humans and
for a consistency check (the worker recomputes the box from the run's plan and refuses a
mismatch). Anything that does not parse into `TaskMessage` is malformed: the worker fails it
like any task (a newer worker may read a newer version), so after max_attempts it is in dead
letters with the parse error; it never crashes a worker.
"""
from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .geometry import Box

VERSION = 1
MAX_BYTES = 4096          # a task message is ~100 bytes; anything far larger is not one
Int3 = Annotated[list[int], Field(min_length=3, max_length=3)]


class MalformedMessage(ValueError):
    """A message body that is not a valid task message."""


class TaskMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = VERSION
    run: str = Field(min_length=1, max_length=200)
    stage: str = Field(min_length=1, max_length=100)
    index: int = Field(ge=0)
    box: Annotated[list[Int3], Field(min_length=2, max_length=2)]

    @property
    def bbox(self) -> Box:
        return Box(self.box[0], self.box[1])


def encode(run: str, stage: str, index: int, box: Box) -> str:
    """The message body (compact JSON; written by hand for publish speed)."""
    (a, b, c), (d, e, f) = box.start, box.stop
    return (f'{{"v":{VERSION},"run":{json.dumps(run)},"stage":{json.dumps(stage)},'
            f'"index":{index},"box":[[{a},{b},{c}],[{d},{e},{f}]]}}')


def decode(body: str | bytes) -> TaskMessage:
    """A `TaskMessage`, or `MalformedMessage` saying what is wrong: too large (refused before
    it is parsed), not JSON, another version, or the first bad field."""
    size = len(body)
    if size > MAX_BYTES:
        raise MalformedMessage(f"malformed task message ({size} bytes; a task message is at "
                               f"most {MAX_BYTES})")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedMessage(f"malformed task message (not JSON: {exc})") from None
    if not isinstance(data, dict):
        raise MalformedMessage(f"malformed task message (a JSON {type(data).__name__}, not an "
                               "object)")
    if "v" in data and data["v"] != VERSION:
        raise MalformedMessage(f"task message version {data['v']!r} is not one this worker "
                               f"reads (version {VERSION}): a newer or older voxflow "
                               "published it")
    try:
        return TaskMessage.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        raise MalformedMessage(f"malformed task message ({where}: {first['msg']})") from None
