"""The voxflow Airflow plugin: a runs page (progress per stage, dead letters) under
/voxflow, linked from the UI's Browse menu, and a Neuroglancer link on the finalize task."""
from airflow.plugins_manager import AirflowPlugin

from operators.links import NeuroglancerLink
from operators.ui import app


class VoxflowPlugin(AirflowPlugin):
    name = "voxflow"
    fastapi_apps = [{"app": app, "url_prefix": "/voxflow", "name": "voxflow runs"}]
    external_views = [{"name": "voxflow runs", "href": "/voxflow/", "destination": "nav",
                       "category": "browse"}]
    operator_extra_links = [NeuroglancerLink()]
