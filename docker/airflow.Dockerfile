# syntax=docker/dockerfile:1
# voxflow's Airflow: Apache Airflow 3.3.2 + voxflow + operators (installed packages: the
# triggerer cannot load code from the DAG folder) + dags/, plugins/ and airflow.cfg.
# One image for every component; the command picks it:
#
#   docker build -f docker/airflow.Dockerfile -t voxflow-airflow .          # from the repo root
#   docker run ... voxflow-airflow api-server | scheduler | dag-processor | triggerer | db migrate
#
# Base: python:3.11-slim + requirements.txt rather than apache/airflow:3.3.2-python3.11. The
# repository's requirements.txt (apache-airflow==3.3.2 next to voxflow's pins) is the set that
# `make test` resolves and runs the Airflow tests against; installing exactly it reproduces
# that environment. The official image pre-installs Airflow with its constraints file and a
# set of providers; voxflow's own pins (pydantic, numpy, google-cloud-storage, ...) would then
# be re-resolved on top of it, into a combination nobody tested.
#
# torch is needed here too (CPU build): the plan task loads the model to check it (channels,
# patch size) before anything is published.
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY requirements.txt docker/requirements.sh docker/requirements-airflow.txt /tmp/build/
RUN sh /tmp/build/requirements.sh airflow /tmp/build/requirements.txt > /tmp/build/airflow.txt \
 && pip install --index-url "$TORCH_INDEX_URL" "$(grep -E '^torch==' /tmp/build/airflow.txt)" \
 && pip install -r /tmp/build/airflow.txt \
 && rm -rf /tmp/build

# voxflow and operators, as packages (pyproject.toml finds both).
COPY pyproject.toml README.md /tmp/src/
COPY voxflow /tmp/src/voxflow
COPY operators /tmp/src/operators
RUN pip install --no-deps /tmp/src && rm -rf /tmp/src

# The Airflow side of the repository. airflow.cfg finds the rest through $VOXFLOW_REPO and
# $AIRFLOW_HOME. Pipelines (dags/pipelines/*.yaml) are deployment data, not part of the
# image: mount them (the compose stack mounts docker/pipelines/) or add them in a derived
# image. The repository's demo pipeline points at files of a checkout (demo-output/), so it
# is left out.
COPY airflow.cfg /opt/voxflow/airflow.cfg
COPY dags/voxflow_pipelines.py /opt/voxflow/dags/voxflow_pipelines.py
COPY plugins /opt/voxflow/plugins
# Models live under /opt/voxflow/models in every voxflow image (the workers load the path
# the plan task checked): the demo model is here; derived images add theirs.
COPY voxflow/demo/rsunet.py voxflow/demo/rsunet.safetensors /opt/voxflow/models/demo/

# uid 50000, gid 0: the convention of the official Airflow image (and its Helm chart).
RUN useradd --create-home --uid 50000 --gid 0 --shell /usr/sbin/nologin airflow \
 && mkdir -p /opt/voxflow/dags/pipelines /opt/airflow/logs \
 && chown -R airflow:0 /opt/airflow

ENV AIRFLOW_HOME=/opt/airflow \
    AIRFLOW_CONFIG=/opt/voxflow/airflow.cfg \
    VOXFLOW_REPO=/opt/voxflow \
    VOXFLOW_HOME=/opt/airflow/voxflow

USER 50000:0
WORKDIR /opt/airflow
EXPOSE 8080
ENTRYPOINT ["airflow"]
CMD ["api-server"]
