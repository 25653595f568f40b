"""`make demo`: the demo pipeline through Airflow, start to finish.

Generates the synthetic EM volume (if missing), starts Airflow on a free loopback port,
triggers the `demo` DAG through the REST API, follows its tasks, prints the summary and
where to look, and stops Airflow.
"""
from __future__ import annotations

import time

from .local import REPO, free_port, start

DAG_ID = "demo"


def main() -> None:
    from voxflow.demo.run import section_png, write_image
    from voxflow.geometry import Box
    from voxflow.volume import Volume
    out = REPO / "demo-output"
    image_url = f"file://{out}/image"
    if not Volume.exists(image_url):
        write_image(image_url)
    af = start(REPO / ".airflow", free_port())
    print(f"Airflow up at {af.url} (user admin, password {af.password()})", flush=True)
    try:
        token = af.token()
        deadline = time.monotonic() + 120
        while not af.api("GET", f"/dags?dag_id_pattern={DAG_ID}", token=token)["dags"]:
            if time.monotonic() > deadline:
                raise RuntimeError("the demo DAG did not appear; see .airflow/logs")
            time.sleep(1)
        run = af.api("POST", f"/dags/{DAG_ID}/dagRuns", {"logical_date": None},
                     token=token)["dag_run_id"]
        print(f"triggered {DAG_ID} run {run}", flush=True)
        seen: dict[str, str] = {}
        while True:
            state = af.api("GET", f"/dags/{DAG_ID}/dagRuns/{run}", token=token)["state"]
            for ti in af.api("GET", f"/dags/{DAG_ID}/dagRuns/{run}/taskInstances",
                             token=token)["task_instances"]:
                if ti["state"] and seen.get(ti["task_id"]) != ti["state"]:
                    seen[ti["task_id"]] = ti["state"]
                    print(f"  {ti['task_id']:<24} {ti['state']}", flush=True)
            if state in ("success", "failed"):
                break
            time.sleep(1)
        if state != "success":
            raise SystemExit(f"the demo run failed; task logs under {af.home}/logs")
        summary = af.api("GET", f"/dags/{DAG_ID}/dagRuns/{run}/taskInstances/finalize/"
                         "xcomEntries/return_value", token=token)["value"]
    finally:
        af.stop()
    pred = Volume(summary["output"])
    z = pred.bounds.shape[2] // 2
    b = pred.bounds
    section = pred.read(Box((b.start[0], b.start[1], z), (b.stop[0], b.stop[1], z + 1)))[0, 0]
    image = Volume(image_url).read(Box((b.start[0], b.start[1], z), (b.stop[0], b.stop[1],
                                                                      z + 1)))[0, 0]
    png = out / "section-airflow.png"
    section_png(image, section, png)
    print(f"\nvoxflow demo through Airflow: {summary['voxels']:,} voxels in "
          f"{summary['seconds']} s")
    print(f"  boundary map    {summary['output']}  (uint8, mips 0..2)")
    print(f"  section z={z}    {png}  (input | boundary)")
    if summary.get("view_command"):          # local layers: the command serves the link
        print(f"  serve it:        .venv/bin/{summary['view_command']}")
    print(f"  in Neuroglancer: {summary['neuroglancer']}")
    print("  Airflow UI:      make airflow")


if __name__ == "__main__":
    main()
