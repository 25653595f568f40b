"""`voxflow view` serves precomputed layers the way Neuroglancer reads them, and to no one
else: real HTTP requests on 127.0.0.1 from the viewer's origin, another origin, a rebound
Host name, and without the link's token."""
import gzip
import json
import threading
import urllib.parse
import urllib.request

import numpy as np
import pytest

from voxflow.view import NEUROGLANCER, make_server, origin_of

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


def _base(link: str, name: str = "img") -> str:
    """The served layer's URL, as the Neuroglancer link names it (with the token)."""
    state = json.loads(urllib.parse.unquote(link.split("#!", 1)[1]))
    (source,) = [l["source"] for l in state["layers"] if l["name"] == name]
    return source.removeprefix("precomputed://")


def _get(url: str, method: str = "GET", **headers):
    """(status, headers, body) of one request; errors are answers too."""
    req = urllib.request.Request(url, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def test_info_and_chunks_with_cors(served):
    server, link, data = served
    host, port = server.server_address
    assert host == "127.0.0.1"
    base = _base(link)
    assert base.startswith(f"http://127.0.0.1:{port}/") and base.endswith("/img")
    viewer = origin_of(NEUROGLANCER)
    with urllib.request.urlopen(urllib.request.Request(f"{base}/info",
                                                       headers={"Origin": viewer})) as r:
        assert r.headers["Access-Control-Allow-Origin"] == viewer
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


def test_only_the_viewer_reads_the_layers(served, tmp_path):
    """Any page in the browser can send requests to 127.0.0.1: only the link's viewer gets
    CORS; another origin, a rebound Host and a request without the token get nothing."""
    server, link, data = served
    port = server.server_address[1]
    base = _base(link)
    token = base.split("/")[3]
    assert len(token) >= 20
    key = json.loads((tmp_path / "img" / "info").read_text())["scales"][0]["key"]
    chunk = f"{base}/{key}/0-16_0-16_0-4"
    viewer = origin_of(NEUROGLANCER)
    status, headers, body = _get(chunk, Origin=viewer)
    assert status == 200 and headers["Access-Control-Allow-Origin"] == viewer
    assert np.array_equal(np.frombuffer(body, np.uint8).reshape(4, 16, 16),
                          data[0, :4, :16, :16])
    assert "Origin" in headers["Vary"]
    for origin in ("https://evil.example", "http://127.0.0.1:8000", "null",
                   viewer + ".evil.example"):
        status, headers, body = _get(chunk, Origin=origin)
        assert status == 403 and headers["Access-Control-Allow-Origin"] is None, origin
        assert data[0, :4, :16, :16].tobytes() not in body
    # the browser's preflight of a ranged read: granted to the viewer only
    status, headers, _ = _get(chunk, "OPTIONS", Origin=viewer,
                              **{"Access-Control-Request-Method": "GET",
                                 "Access-Control-Request-Headers": "range"})
    assert status == 204 and headers["Access-Control-Allow-Origin"] == viewer
    assert "Range" in headers["Access-Control-Allow-Headers"]
    status, headers, _ = _get(chunk, "OPTIONS", Origin="https://evil.example",
                              **{"Access-Control-Request-Method": "GET"})
    assert status == 403 and headers["Access-Control-Allow-Origin"] is None
    # DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1
    status, _, body = _get(chunk, Host=f"evil.example:{port}")
    assert status == 403 and not body.startswith(data[0, :1].tobytes() * 4)
    assert _get(chunk, Host=f"localhost:{port}")[0] == 200
    # without the link's token (or with another) there is nothing to read
    for url in (f"http://127.0.0.1:{port}/img/{key}/0-16_0-16_0-4",
                f"http://127.0.0.1:{port}/{'x' * len(token)}/img/info",
                f"http://127.0.0.1:{port}/"):
        assert _get(url)[0] == 404, url
    # no Origin at all (a tool on this machine, e.g. tensorstore): served, no CORS header
    status, headers, _ = _get(chunk)
    assert status == 200 and headers["Access-Control-Allow-Origin"] is None


def test_another_viewer_origin_can_be_allowed(tmp_path):
    make_layer(tmp_path / "img", np.zeros((1, 4, 16, 16), np.uint8), chunk=(16, 16, 4))
    server, link = make_server([str(tmp_path / "img")], port=0,
                               origins=["https://ng.example.org/some/path"])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = _base(link) + "/info"
        status, headers, _ = _get(url, Origin="https://ng.example.org")
        assert status == 200 and headers["Access-Control-Allow-Origin"] == \
            "https://ng.example.org"
        assert _get(url, Origin=origin_of(NEUROGLANCER))[0] == 200
        assert _get(url, Origin="https://ng.example.org.evil")[0] == 403
    finally:
        server.shutdown()
        server.server_close()


def test_gzip_chunks_of_other_tools_are_served_encoded(served, tmp_path):
    server, link, data = served
    key = json.loads((tmp_path / "img" / "info").read_text())["scales"][0]["key"]
    plain = tmp_path / "img" / key / "0-16_0-16_0-4"
    plain.with_name(plain.name + ".gz").write_bytes(gzip.compress(plain.read_bytes()))
    plain.unlink()                                  # as cloud-volume names gzip chunks
    url = f"{_base(link)}/{key}/0-16_0-16_0-4"
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
    server, link = make_server([str(tmp_path / "sh")], port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = _base(link, "sh") + "/"
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


def test_the_link_is_known_before_the_server_starts(tmp_path, monkeypatch):
    """`view_link` (what Airflow's finalize and the console show) is the link a server of
    the same layers on that port serves, and it reads the layer; another user's key (another
    VOXFLOW_HOME) gives another token."""
    from voxflow.view import view_link
    data = np.full((1, 4, 16, 16), 7, np.uint8)
    make_layer(tmp_path / "img", data, chunk=(16, 16, 4))
    paths = [f"file://{tmp_path}/img"]
    server, link = make_server(paths, port=0)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert view_link(paths, port=port) == link
        status, _, body = _get(f"{_base(link)}/info", Origin=origin_of(NEUROGLANCER))
        assert status == 200 and json.loads(body)["data_type"] == "uint8"
    finally:
        server.shutdown()
        server.server_close()
    again, link2 = make_server(paths, port=port)         # restarted: the same link
    again.server_close()
    assert link2 == link
    monkeypatch.setenv("VOXFLOW_HOME", str(tmp_path / "someone-else"))
    assert view_link(paths, port=port) != link
