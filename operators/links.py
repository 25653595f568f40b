"""Operator extra links: the finished run in Neuroglancer (or the command that serves a local
output to it), from the finalize task's summary."""
from __future__ import annotations

from airflow.sdk import BaseOperatorLink, XCom


class NeuroglancerLink(BaseOperatorLink):
    name = "Neuroglancer"

    def get_link(self, operator, *, ti_key) -> str:
        summary = XCom.get_value(ti_key=ti_key, key="return_value") or {}
        target = summary.get("neuroglancer", "")
        return target if target.startswith("http") else "/voxflow/"
