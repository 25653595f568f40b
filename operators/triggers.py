"""Deferrable waiting: a trigger that polls a stage's counters in the triggerer.

The waiting task holds no worker slot while deferred. The trigger fires when the stage has
nothing open (drained: done or dead), or after `tick_seconds` so the operator can resume
briefly to re-size the worker group (replace dead workers) and defer again.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

from airflow.triggers.base import BaseTrigger, TriggerEvent


class StageTrigger(BaseTrigger):
    def __init__(self, queue_url: str, run: str, stage: str, poll_seconds: float = 2.0,
                 tick_seconds: float = 30.0):
        super().__init__()
        self.queue_url = queue_url
        self.run_id = run
        self.stage = stage
        self.poll_seconds = poll_seconds
        self.tick_seconds = tick_seconds

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("operators.triggers.StageTrigger",
                {"queue_url": self.queue_url, "run": self.run_id, "stage": self.stage,
                 "poll_seconds": self.poll_seconds, "tick_seconds": self.tick_seconds})

    def _counts(self, queue) -> dict[str, int]:
        s = queue.stats(self.run_id).get(self.stage)
        if s is None:
            return {"pending": 0, "leased": 0, "done": 0, "dead": 0}
        return {"pending": s.pending, "leased": s.leased, "done": s.done, "dead": s.dead}

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from voxflow.queues import open_queue
        queue = await asyncio.to_thread(open_queue, self.queue_url)
        started = time.monotonic()
        try:
            while True:
                # the operator checked just before deferring: look again only after a poll
                await asyncio.sleep(self.poll_seconds)
                counts = await asyncio.to_thread(self._counts, queue)
                if counts["pending"] + counts["leased"] == 0:
                    yield TriggerEvent({"status": "drained", "stage": self.stage, **counts})
                    return
                if time.monotonic() - started >= self.tick_seconds:
                    yield TriggerEvent({"status": "tick", "stage": self.stage, **counts})
                    return
        finally:
            queue.close()
