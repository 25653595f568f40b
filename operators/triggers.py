"""Triggers: deferrable waiting on a stage, and watching files for a change.

`StageTrigger` polls a stage's counters in the triggerer, so the waiting task holds no worker
slot. It is the run's driver while it waits: it heart-beats the run every poll, and when the
user marks the run failed (or clears or succeeds the task) Airflow calls its `on_kill`, which
ends the run as cancelled — the run's workers give it up at once. It fires when the stage has
nothing open (drained: done or dead), when messages may have outlived the queue's retention
(the operator republishes them), or after `tick_seconds` so the operator can re-size the
worker group (replace dead workers) and defer again.

`FileDigestTrigger` is an event trigger for an `AssetWatcher`: it polls files' digests
(file:// and gs://, through `voxflow.storage`) and fires when one changes — a retrained model
starts a rerun by itself. The last digests seen are kept in Airflow's asset state store, so a
change made while the triggerer was down is still noticed when it comes back.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

from airflow.triggers.base import BaseEventTrigger, BaseTrigger, TriggerEvent


class StageTrigger(BaseTrigger):
    def __init__(self, queue_url: str, run: str, stage: str, poll_seconds: float = 2.0,
                 tick_seconds: float = 30.0, retention_seconds: int = 604_800):
        super().__init__()
        self.queue_url = queue_url
        self.run_id = run
        self.stage = stage
        self.poll_seconds = poll_seconds
        self.tick_seconds = tick_seconds
        self.retention_seconds = retention_seconds

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("operators.triggers.StageTrigger",
                {"queue_url": self.queue_url, "run": self.run_id, "stage": self.stage,
                 "poll_seconds": self.poll_seconds, "tick_seconds": self.tick_seconds,
                 "retention_seconds": self.retention_seconds})

    def _open(self):
        from voxflow.queues import open_queue
        return open_queue(self.queue_url, retention_seconds=self.retention_seconds)

    def _poll(self, queue) -> tuple[dict[str, int], list[str]]:
        expired = queue.heartbeat(self.run_id)
        s = queue.stats(self.run_id).get(self.stage)
        if s is None:
            return {"pending": 0, "leased": 0, "done": 0, "dead": 0}, expired
        return {"pending": s.pending, "leased": s.leased, "done": s.done, "dead": s.dead}, \
            expired

    async def run(self) -> AsyncIterator[TriggerEvent]:
        queue = await asyncio.to_thread(self._open)
        started = time.monotonic()
        try:
            while True:
                # the operator checked just before deferring: look again only after a poll
                await asyncio.sleep(self.poll_seconds)
                counts, expired = await asyncio.to_thread(self._poll, queue)
                if counts["pending"] + counts["leased"] == 0:
                    yield TriggerEvent({"status": "drained", "stage": self.stage, **counts})
                    return
                if expired or time.monotonic() - started >= self.tick_seconds:
                    yield TriggerEvent({"status": "republish" if expired else "tick",
                                        "stage": self.stage, **counts})
                    return
        finally:
            queue.close()

    async def on_kill(self) -> None:
        """The user marked the run failed (or cleared the task): the run is over."""
        def end() -> None:
            queue = self._open()
            try:
                queue.end_run(self.run_id, "cancelled")
            finally:
                queue.close()
        await asyncio.to_thread(end)


class FileDigestTrigger(BaseEventTrigger):
    """Fires when the digest of any of `urls` changes (a file appearing or going counts)."""

    def __init__(self, urls: list[str], poll_seconds: float = 60.0):
        super().__init__()
        self.urls = list(urls)
        self.poll_seconds = poll_seconds

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("operators.triggers.FileDigestTrigger",
                {"urls": self.urls, "poll_seconds": self.poll_seconds})

    def _digests(self) -> dict[str, str]:
        from voxflow.storage import file_digest
        return {url: file_digest(url) for url in self.urls}

    async def run(self) -> AsyncIterator[TriggerEvent]:
        store = self.asset_state_store
        seen = await store.aget("digests") if store is not None else None
        while True:
            now = await asyncio.to_thread(self._digests)
            if seen is not None and now != seen:
                changed = sorted(u for u in now if now[u] != seen.get(u))
                self.log.info("changed: %s", changed)
                yield TriggerEvent({"changed": changed, "digests": now})
            if now != seen:          # after the event: a crash in between fires twice, never
                if store is not None:                           # loses a change
                    await store.aset("digests", now)
                if seen is None:
                    self.log.info("watching %s: %s", ", ".join(self.urls), now)
                seen = now
            await asyncio.sleep(self.poll_seconds)
