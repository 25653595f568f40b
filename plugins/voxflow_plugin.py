"""The voxflow Airflow plugin: the console (runs, a run's progress, chunk map and dead
letters) under /voxflow, in the UI's Browse menu and as a tab of every DAG run; a
Neuroglancer link on the finalize task; and a listener that notes a refusal at plan on its
DAG run."""
from airflow.plugins_manager import AirflowPlugin

from operators import listeners
from operators.links import NeuroglancerLink
from operators.ui import app


class VoxflowPlugin(AirflowPlugin):
    name = "voxflow"
    fastapi_apps = [{"app": app, "url_prefix": "/voxflow", "name": "voxflow console"}]
    external_views = [
        {"name": "voxflow runs", "href": "/voxflow/", "destination": "nav",
         "category": "browse", "url_route": "voxflow"},
        {"name": "voxflow", "href": "/voxflow/dag-run/{DAG_ID}/{RUN_ID}",
         "destination": "dag_run", "url_route": "voxflow-run"},
    ]
    operator_extra_links = [NeuroglancerLink()]
    listeners = [listeners]          # a refusal at plan becomes the DAG run's note
