"""Airflow DAGs: one per pipeline config in dags/pipelines/*.yaml (see operators.dag_factory)."""
from pathlib import Path

from operators.dag_factory import build_dags

globals().update(build_dags(Path(__file__).parent / "pipelines"))
