"""The voxflow page in the Airflow UI: every run in the queue, its stages' progress and dead
letters. A FastAPI app mounted by the plugin under /voxflow; Airflow's own login applies."""
from __future__ import annotations

import html
from typing import Optional

from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import HTMLResponse

from airflow.api_fastapi.core_api.security import requires_authenticated

app = FastAPI(title="voxflow", dependencies=[Depends(requires_authenticated())])


def _queue(url: Optional[str]):
    from voxflow.config import QueueConfig
    from voxflow.queues import open_queue
    return open_queue(url or QueueConfig().url)


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
