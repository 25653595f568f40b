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


def test_info_and_chunks_with_cors(served):
    server, link, data = served
    host, port = server.server_address
    assert host == "127.0.0.1"
    base = f"http://127.0.0.1:{port}/img"
    with urllib.request.urlopen(f"{base}/info") as r:
        assert r.headers["Access-Control-Allow-Origin"] == "*"
        info = json.loads(r.read())
    key = info["scales"][0]["key"]
    with urllib.request.urlopen(f"{base}/{key}/0-16_0-16_0-4") as r:     # voxflow's: plain
        assert r.headers["Content-Encoding"] is None
        chunk = np.frombuffer(r.read(), np.uint8).reshape(4, 16, 16)
    assert np.array_equal(chunk, data[0, :4, :16, :16])
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{base}/../../etc/passwd")
    assert err.value.code == 404
    state = json.loads(urllib.parse.unquote(link.split("#!", 1)[1]))
    sources = [layer["source"] for layer in state["layers"]]
    assert sources == [f"precomputed://{base}", "precomputed://gs://bucket/pred"]


def test_gzip_chunks_of_other_tools_are_served_encoded(served, tmp_path):
    server, _, data = served
    key = json.loads((tmp_path / "img" / "info").read_text())["scales"][0]["key"]
    plain = tmp_path / "img" / key / "0-16_0-16_0-4"
    plain.with_name(plain.name + ".gz").write_bytes(gzip.compress(plain.read_bytes()))
    plain.unlink()                                  # as cloud-volume names gzip chunks
    url = f"http://127.0.0.1:{server.server_address[1]}/img/{key}/0-16_0-16_0-4"
    with urllib.request.urlopen(url) as r:
        assert r.headers["Content-Encoding"] == "gzip"
        chunk = np.frombuffer(gzip.decompress(r.read()), np.uint8).reshape(4, 16, 16)
    assert np.array_equal(chunk, data[0, :4, :16, :16])


def test_a_sharded_layer_reads_through_the_server_with_byte_ranges(tmp_path):
    """What Neuroglancer does with a sharded layer: range reads of the shard files; here
    tensorstore's http driver reads the whole layer through `voxflow view`."""
    ts = pytest.importorskip("tensorstore")
    from voxflow.volume import Volume
    data = (np.random.default_rng(2).random((2, 16, 64, 64)) * 255).astype(np.uint8)
    v = Volume.create(f"file://{tmp_path}/sh", num_channels=2, dtype="uint8",
                      resolution=(8, 8, 40), voxel_offset=(0, 0, 0), size=(64, 64, 16),
                      chunk=(16, 16, 8), shard_bytes=16 * 16 * 8 * 2 * 4)
    v.write(v.bounds, data)
    server, _ = make_server([str(tmp_path / "sh")], port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/sh/"
        shard = next((tmp_path / "sh" / v.key).iterdir())
        req = urllib.request.Request(base + f"{v.key}/{shard.name}",
                                     headers={"Range": "bytes=4-19"})
        with urllib.request.urlopen(req) as r:
            assert r.status == 206 and r.read() == shard.read_bytes()[4:20]
            assert r.headers["Content-Range"] == f"bytes 4-19/{shard.stat().st_size}"
        store = ts.open({"driver": "neuroglancer_precomputed",
                         "kvstore": {"driver": "http", "base_url": base}}).result()
        got = np.asarray(store.read().result()).transpose(3, 2, 1, 0)
        assert np.array_equal(got, data)
    finally:
        server.shutdown()
        server.server_close()
