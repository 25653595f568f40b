"""Operator extra links: the finished run in Neuroglancer (or, for a local output that needs
`voxflow view` to be served, the voxflow runs page), from the finalize task's summary.

Airflow 3 evaluates a link once, in the task's process when it ends, and keeps the result;
the API server only reads it back.
"""
from __future__ import annotations

from airflow.sdk import BaseOperatorLink


class NeuroglancerLink(BaseOperatorLink):
    name = "Neuroglancer"

    def get_link(self, operator, *, ti_key) -> str:
        from airflow.sdk.execution_time.xcom import XCom
        summary = XCom.get_value(ti_key=ti_key, key="return_value") or {}
        target = summary.get("neuroglancer", "")
        return target if target.startswith("http") else "/voxflow/"
