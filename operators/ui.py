"""The voxflow page in the Airflow UI: every run in the queue, its stages' progress and dead
letters. A FastAPI app mounted by the plugin under /voxflow; Airflow's own login applies.

It opens only the queues the deployment knows — the embedded default and the `queue.url` of
each pipeline in the DAG folder — and opens them read-only: a logged-in user cannot make the
API server create SQLite files or read another project's Pub/Sub by typing a URL, and a GET
changes nothing.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Optional

from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import HTMLResponse

from airflow.api_fastapi.core_api.security import requires_authenticated

app = FastAPI(title="voxflow", dependencies=[Depends(requires_authenticated())])


def known_queues() -> list[str]:
    """The embedded default queue, then the queues the deployed pipeline files name."""
    from airflow.configuration import conf
    from voxflow.config import ConfigError, QueueConfig
    from voxflow.pipeline_file import load_pipeline
    urls = [QueueConfig().url]
    folder = Path(conf.get("core", "dags_folder")) / "pipelines"
    for path in sorted(folder.glob("*.yaml")):
        try:
            urls.append(load_pipeline(path)[1].queue.url)
        except ConfigError:
            continue                         # the DAG folder's import error reports it
    return list(dict.fromkeys(urls))


class _NoQueue:
    """A known queue with nothing in it yet (its SQLite file does not exist)."""

    url = ""

    def runs(self) -> list[str]:
        return []

    def stats(self, run: str) -> dict:
        return {}

    def close(self) -> None:
        pass


def _queue(url: Optional[str]):
    from voxflow.queues import open_queue
    known = known_queues()
    if url is None:
        url = known[0]
    elif url not in known:
        raise HTTPException(404, "no such queue in this deployment")
    try:
        return open_queue(url, readonly=True)
    except FileNotFoundError:
        return _NoQueue()


def runs_report(queue_url: Optional[str] = None, limit: int = 50) -> list[dict]:
    """Newest runs first: per stage total, pending, leased, done, dead."""
    queue = _queue(queue_url)
    try:
        report = []
        for run in reversed(queue.runs()[-limit:]):
            stages = {name: {**vars(s), "total": s.total} for name, s in
                      queue.stats(run).items()}
            report.append({"run": run, "stages": stages})
        return report
    finally:
        queue.close()


@app.get("/runs")
def runs(queue: Optional[str] = None) -> list[dict]:
    return runs_report(queue)


@app.get("/runs/{run}")
def run_detail(run: str, queue: Optional[str] = None) -> dict:
    q = _queue(queue)
    try:
        stats = q.stats(run)
        if not stats:
            raise HTTPException(404, f"no run {run!r} in {q.url}")
        return {"run": run, "stages": {n: {**vars(s), "total": s.total} for n, s in
                                       stats.items()},
                "dead": [vars(d) for d in q.dead_letters(run)]}
    finally:
        q.close()


def _bar(s: dict) -> str:
    total = max(s["total"], 1)
    done, dead = 100 * s["done"] / total, 100 * s["dead"] / total
    return (f'<div class="bar"><span class="done" style="width:{done:.1f}%"></span>'
            f'<span class="dead" style="width:{dead:.1f}%"></span></div>')


@app.get("/", response_class=HTMLResponse)
def page(queue: Optional[str] = None) -> str:
    rows = []
    for r in runs_report(queue):
        for name, s in r["stages"].items():
            rows.append(f"<tr><td>{html.escape(r['run'])}</td><td>{html.escape(name)}</td>"
                        f"<td>{_bar(s)}</td><td>{s['done']} / {s['total']}</td>"
                        f"<td>{s['leased']}</td><td>{s['dead']}</td></tr>")
    body = "\n".join(rows) or '<tr><td colspan="6">no runs yet</td></tr>'
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>voxflow runs</title>
<meta http-equiv="refresh" content="5"><style>
body {{ font-family: sans-serif; margin: 2em; }} table {{ border-collapse: collapse; }}
td, th {{ padding: 4px 10px; border-bottom: 1px solid #ddd; text-align: left; }}
.bar {{ width: 240px; height: 12px; background: #eee; display: flex; }}
.done {{ background: #3a8; }} .dead {{ background: #c33; }}
</style></head><body><h2>voxflow runs</h2>
<table><tr><th>run</th><th>stage</th><th>progress</th><th>done</th><th>working</th>
<th>dead</th></tr>{body}</table></body></html>"""
