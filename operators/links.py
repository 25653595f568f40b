"""Operator extra links: the finished run in Neuroglancer, from the finalize task's summary
(for local layers, the link `voxflow view` serves: the summary and the log give the command).

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
        return target
