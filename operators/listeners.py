"""Airflow listeners of the voxflow plugin (they run in the scheduler, which may write the
metadata DB): a DAG run refused at plan gets the refusal as its note, where Airflow's UI
shows it on the run. A task cannot set its own DAG run's note (Airflow 3.3's task API has no
such call), so the plan task leaves the refusal as its XCom `refused` and this hook, called
when the DAG run fails, copies it."""
from __future__ import annotations

import json

from airflow.listeners import hookimpl

PLAN_TASK, REFUSED_KEY = "plan", "refused"


def refusal_note(refused: dict) -> str:
    return f"refused at plan, nothing published: {refused['field']}: {refused['message']}"


@hookimpl
def on_dag_run_failed(dag_run, msg: str) -> None:
    from sqlalchemy import select
    from sqlalchemy.orm import object_session

    from airflow.models.xcom import XComModel
    session = object_session(dag_run)
    if session is None or dag_run.note:
        return                           # a person's note is never replaced
    value = session.scalar(select(XComModel.value).where(
        XComModel.dag_id == dag_run.dag_id, XComModel.run_id == dag_run.run_id,
        XComModel.task_id == PLAN_TASK, XComModel.key == REFUSED_KEY))
    if isinstance(value, str):
        value = json.loads(value)
    if isinstance(value, dict) and "field" in value:
        dag_run.note = refusal_note(value)[:1000]
