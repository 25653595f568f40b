"""`voxflow view` serves precomputed layers the way Neuroglancer reads them."""
import gzip
import json
import threading
import urllib.parse
import urllib.request

import numpy as np
import pytest

from voxflow.view import make_server

from conftest import make_layer


@pytest.fixture
def served(tmp_path):
    data = (np.arange(32 * 32 * 8) % 251).astype(np.uint8).reshape(1, 8, 32, 32)
    make_layer(tmp_path / "img", data, chunk=(16, 16, 4))
    server, link = make_server([str(tmp_path / "img"), "gs://bucket/pred"], port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, link, data
    server.shutdown()
    server.server_close()


def test_info_and_gzip_chunks_with_cors(served):
    server, link, data = served
    host, port = server.server_address
    assert host == "127.0.0.1"
    base = f"http://127.0.0.1:{port}/img"
    with urllib.request.urlopen(f"{base}/info") as r:
        assert r.headers["Access-Control-Allow-Origin"] == "*"
        info = json.loads(r.read())
    key = info["scales"][0]["key"]
    with urllib.request.urlopen(f"{base}/{key}/0-16_0-16_0-4") as r:
        assert r.headers["Content-Encoding"] == "gzip"
        chunk = np.frombuffer(gzip.decompress(r.read()), np.uint8).reshape(4, 16, 16)
    assert np.array_equal(chunk, data[0, :4, :16, :16])
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{base}/../../etc/passwd")
    assert err.value.code == 404
    state = json.loads(urllib.parse.unquote(link.split("#!", 1)[1]))
    sources = [layer["source"] for layer in state["layers"]]
    assert sources == [f"precomputed://{base}", "precomputed://gs://bucket/pred"]
