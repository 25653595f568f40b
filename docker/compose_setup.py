"""One-shot set-up steps of the compose stack (run inside the Airflow image).

    python compose_setup.py bucket NAME        # create a bucket in the GCS emulator
    python compose_setup.py demo-data URL      # the synthetic EM demo volume at URL

Both are idempotent: a bucket or a layer that exists is left as it is.
"""
from __future__ import annotations

import os
import sys
import time


def bucket(name: str, wait: float = 60.0) -> None:
    from google.api_core.exceptions import Conflict
    from google.cloud import storage
    if not os.environ.get("STORAGE_EMULATOR_HOST"):
        sys.exit("compose_setup: STORAGE_EMULATOR_HOST is not set; refusing to create "
                 "buckets in a real project")
    client = storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "local-project"))
    deadline = time.monotonic() + wait
    while True:             # the emulator may still be starting
        try:
            client.create_bucket(name)
            print(f"compose_setup: bucket gs://{name} created")
            return
        except Conflict:
            print(f"compose_setup: bucket gs://{name} exists")
            return
        except Exception as exc:  # connection refused while the emulator starts
            if time.monotonic() > deadline:
                raise
            print(f"compose_setup: waiting for the GCS emulator ({type(exc).__name__})")
            time.sleep(2)


def demo_data(url: str) -> None:
    from voxflow.demo.run import write_image
    from voxflow.volume import Volume
    if Volume.exists(url):
        print(f"compose_setup: {url} exists")
        return
    write_image(url)
    print(f"compose_setup: wrote the demo volume to {url}")


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] not in ("bucket", "demo-data"):
        sys.exit(__doc__)
    {"bucket": bucket, "demo-data": demo_data}[argv[0]](argv[1])


if __name__ == "__main__":
    main(sys.argv[1:])
