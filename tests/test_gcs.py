"""gs:// against a GCS emulator (fake-gcs-server, the `gcs` fixture): `Storage` behaves the
same on gs:// and file://, `Volume` and `TemporaryStore` work on gs://, a whole run reads and
writes gs:// layers and equals the same run on a local disk, and a missing gs:// input is
refused before anything is written."""
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import voxflow.runner
from voxflow.temporary import TemporaryStore, partial_key, temporary_url
from voxflow.cli import main
from voxflow.config import load_config
from voxflow.geometry import Box
from voxflow.pipeline import plan
from voxflow.storage import Storage
from voxflow.volume import Volume

from conftest import Pointwise, SmallConv, write_config


def _raw_objects(store: Storage, gcs) -> dict[str, bytes]:
    """What is really stored under the prefix, read without Storage or cloud-files:
    key -> stored bytes."""
    if store.url.startswith("file://"):
        root = Path(store.url[len("file://"):])
        return {p.relative_to(root).as_posix(): p.read_bytes()
                for p in root.rglob("*") if p.is_file()} if root.exists() else {}
    bucket = gcs.client().bucket(gcs.bucket)
    prefix = store.url.removeprefix(f"gs://{gcs.bucket}/") + "/"
    out = {}
    for name in gcs.names(store.url + "/"):
        blob = bucket.get_blob(name)
        assert blob.content_encoding in (None, ""), (name, blob.content_encoding)
        out[name[len(prefix):]] = blob.download_as_bytes(raw_download=True)
    return out


@pytest.fixture(params=["file", "gs"])
def store(request, tmp_path):
    if request.param == "gs":
        gcs = request.getfixturevalue("gcs")
        return Storage(gcs.path("store") + "/"), gcs
    return Storage(str(tmp_path / "store")), None          # a plain path: file://


# -- Storage: the same behaviour on file:// and gs:// --------------------------------------

def test_storage_urls_are_normalised(tmp_path):
    assert Storage(f"{tmp_path}/a/").url == f"file://{tmp_path}/a"
    assert Storage(f"file://{tmp_path}/a/").url == f"file://{tmp_path}/a"
    assert Storage("gs://bucket/ledger/").url == "gs://bucket/ledger"


def test_storage_put_get_overwrite_missing(store):
    s, gcs = store
    blob = bytes(range(256)) * 64                      # binary, would change if compressed
    s.put("runs/r1/params.json", b'{"a": 1}')
    s.put("runs/r1/blob.bin", blob)
    s.put("empty", b"")
    assert s.get("runs/r1/params.json") == b'{"a": 1}'
    assert s.get("runs/r1/blob.bin") == blob
    assert s.get("empty") == b""                       # an empty object exists
    assert s.get("runs/r1/missing") is None
    assert s.get("runs/r1") is None                    # a "folder" is no object
    s.put("runs/r1/params.json", b'{"a": 2}')          # overwrite
    assert s.get("runs/r1/params.json") == b'{"a": 2}'
    # stored as given: under the key's exact name, uncompressed, nothing else
    assert _raw_objects(s, gcs) == {"runs/r1/params.json": b'{"a": 2}',
                                    "runs/r1/blob.bin": blob, "empty": b""}


def test_storage_many_and_list(store):
    s, _ = store
    items = {f"run-1/task/{i}": f"v{i}".encode() for i in range(40)}
    items.update({"run-10/x": b"x", "other/y": b"y"})
    s.put_many(items.items())
    assert s.get_many([*items, "run-1/task/99", "nope"]) == \
        {**items, "run-1/task/99": None, "nope": None}
    assert sorted(s.list()) == sorted(items)
    assert sorted(s.list("run-1/")) == sorted(k for k in items if k.startswith("run-1/"))
    assert sorted(s.list("run-1")) == sorted(k for k in items if k.startswith("run-1"))
    assert sorted(s.list("run-1/task/3")) == \
        ["run-1/task/3", *(f"run-1/task/3{i}" for i in range(10))]     # a string prefix
    assert list(s.list("missing/")) == []
    with pytest.raises(ValueError):
        s.put_many([("dup", b"1"), ("new", b"2"), ("dup", b"3")])
    assert s.get("dup") is None and s.get("new") is None


def test_storage_delete_and_delete_prefix(store):
    s, gcs = store
    keys = [f"run-1/{i}" for i in range(25)] + ["run-10/a", "run-10/b/c", "keep"]
    s.put_many((k, k.encode()) for k in keys)
    s.delete(["run-1/0", "run-1/1", "run-1/never-written", "nope/nope"])
    s.delete([])
    assert s.get("run-1/0") is None and s.get("run-1/2") == b"run-1/2"
    assert sorted(s.list()) == sorted(keys[2:])
    assert s.delete_prefix("run-1/") == 23             # run-10 is not under "run-1/"
    assert sorted(s.list()) == ["keep", "run-10/a", "run-10/b/c"]
    assert s.delete_prefix("run-10/b/") == 1
    assert s.delete_prefix("") == 2
    assert list(s.list()) == [] and s.delete_prefix() == 0
    assert _raw_objects(s, gcs) == {}
    s.put("again/x", b"1")                             # usable after everything went
    assert s.get("again/x") == b"1"


def test_gs_deletes_batch_on_gcs_and_one_by_one_on_the_emulator(gcs, monkeypatch):
    s = Storage(gcs.path("batch"))
    s.put_many([("a", b"1"), ("b", b"2")])
    batches = []
    monkeypatch.setattr(s._files, "delete", lambda keys: batches.append(list(keys)))
    s.delete(["a", "b"])                   # the emulator: no batch call, objects gone
    assert batches == [] and list(s.list()) == []
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    s.delete(["a", "b"])                   # real GCS: cloud-files' batch delete
    assert batches == [["a", "b"]]


@pytest.mark.parametrize("key", ["", "/abs", "../escape", "a/../b", "a//b", "./a", "x.gz"])
def test_storage_refuses_bad_keys(store, key):
    s, gcs = store
    with pytest.raises(ValueError):
        s.put(key, b"1")
    assert _raw_objects(s, gcs) == {}


def test_local_delete_prefix_removes_emptied_folders(tmp_path):
    s = Storage(f"file://{tmp_path}/root")
    s.put_many([("a/b/c", b"1"), ("a/d", b"2"), ("e/f/g", b"3")])
    stale = tmp_path / "root" / "e" / "f" / ".g.0123.voxflow-put"    # a crashed write's
    stale.write_bytes(b"half")
    assert sorted(s.list()) == ["a/b/c", "a/d", "e/f/g"]             # not a key
    assert s.delete_prefix("a/b/") == 1
    assert not (tmp_path / "root" / "a" / "b").exists()
    assert (tmp_path / "root" / "a" / "d").is_file()
    assert s.delete_prefix("e/") == 1
    assert not (tmp_path / "root" / "e").exists()                    # stale file went too
    assert s.delete_prefix() == 1
    assert not (tmp_path / "root").exists()
    assert tmp_path.exists()


def test_local_put_is_atomic(tmp_path):
    """Readers racing a writer see an old or a new object whole, never a torn one."""
    s = Storage(f"file://{tmp_path}/s")
    versions = [bytes([v]) * (1 << 20) for v in range(4)]
    s.put("k", versions[0])
    stop, seen = threading.Event(), []

    def read():
        while not stop.is_set():
            seen.append(s.get("k"))
    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers:
        t.start()
    for i in range(60):
        s.put("k", versions[i % 4])
    stop.set()
    for t in readers:
        t.join()
    assert len(seen) > 10
    assert all(v in versions for v in seen), {len(v) for v in seen if v not in versions}


# -- Volume and TemporaryStore on gs:// ----------------------------------------------------

def test_volume_round_trip_on_gs(gcs):
    url = gcs.path("vol")
    assert not Volume.exists(url)
    vol = Volume.create(url, num_channels=2, dtype="float32", resolution=(4, 4, 40),
                        voxel_offset=(3, 5, 1), size=(45, 37, 11), chunk=(16, 16, 4))
    assert Volume.exists(url) and vol.bounds == Box((3, 5, 1), (48, 42, 12))
    data = np.random.default_rng(0).random((2, 11, 37, 45), dtype=np.float32)
    lower = Box((3, 5, 1), (48, 42, 6))                # two writes, neither chunk-aligned
    upper = Box((3, 5, 6), (48, 42, 12))
    vol.write(lower, data[:, :5])
    vol.write(upper, data[:, 5:])
    again = Volume(url)
    assert again.dtype == np.float32 and again.chunk == (16, 16, 4)
    assert np.array_equal(again.read(again.bounds), data)
    box = Box((40, 0, 10), (50, 9, 13))                # partly outside: zeros there
    got = again.read(box)
    assert got.shape == (2, 3, 9, 10)
    assert np.array_equal(got[:, :2, 5:, :8], data[:, 9:, :4, 37:])
    assert not got[:, 2:].any() and not got[:, :, :5].any() and not got[:, :, :, 8:].any()
    vol.ensure_mips((2, 2, 1), 1)
    assert Volume(url, 1).bounds == Box((1, 2, 1), (24, 21, 12))
    assert any(n.endswith("/info") for n in gcs.names(url + "/"))


def test_temporary_store_on_gs(gcs):
    root = gcs.path("out") + ".voxflow-tmp"
    store, sibling = TemporaryStore(f"{root}/r1"), TemporaryStore(f"{root}/r10")
    rng = np.random.default_rng(1)
    parts = {partial_key((i, 0, 1), t): rng.random((2, 3, 4, 5)).astype(np.float32)
             for i in range(3) for t in range(2)}
    for key, a in parts.items():
        store.put(key, a)
    sibling.put(partial_key((0, 0, 0), 0), parts[partial_key((0, 0, 1), 0)])
    for key, a in parts.items():
        assert np.array_equal(store.get(key, a.shape), a)
    with pytest.raises(ValueError, match="shape"):
        store.get(partial_key((0, 0, 1), 0), (2, 3, 4, 6))
    with pytest.raises(FileNotFoundError):
        store.get(partial_key((9, 9, 9), 0), (2, 3, 4, 5))
    assert len(gcs.names(f"{root}/r1/")) == len(parts)
    store.delete_all()
    assert gcs.names(f"{root}/r1/") == []
    assert len(gcs.names(f"{root}/r10/")) == 1         # another run's data stays
    store.delete_all()                                 # twice is harmless


# -- whole runs with gs:// input and output ------------------------------------------------

def _write_layer(url: str, data: np.ndarray, offset, chunk=(16, 16, 4)) -> None:
    c, z, y, x = data.shape
    vol = Volume.create(url, num_channels=c, dtype=str(data.dtype), resolution=(8, 8, 40),
                        voxel_offset=offset, size=(x, y, z), chunk=chunk)
    vol.write(vol.bounds, data)


def test_overlap_run_on_gs_equals_local_run(tmp_path, gcs, monkeypatch):
    img = (np.random.default_rng(5).random((1, 12, 44, 72)) * 255).astype(np.uint8)
    offset = (3, 5, 1)
    gs_in, gs_out = gcs.path("img"), gcs.path("out")
    _write_layer(gs_in, img, offset)
    _write_layer(f"file://{tmp_path}/img", img, offset)
    torch.jit.script(SmallConv().eval()).save(str(tmp_path / "m.pt"))
    base = dict(model={"path": "m.pt", "input_patch": [16, 16, 8], "output_channels": 2},
                inference={"chunk": [32, 32, 8], "patch_overlap": [6, 6, 3]},
                storage_chunk=[16, 16, 4], downsample={"mips": 1})
    # unsharded on gs:// here (sharded gs:// runs: tests/test_sharding.py)
    on_gs = write_config(tmp_path / "gs.yaml", input=gs_in, output=gs_out, sharding="off",
                         **base)
    local = write_config(tmp_path / "local.yaml", input="img", output="out", **base)
    config = load_config(on_gs)
    p = plan(config)
    assert p.shard_shapes is None
    partials = sum(len(p.grid.bands.sources(c)) for j in range(len(p.grid.bands))
                   for c in p.grid.bands.cells(j))
    assert len(p.grid) >= 6 and len(p.grid.bands) >= 4 and p.downsample  # cut, blended
    temporary = temporary_url(config, "gsrun")
    assert temporary.startswith(gs_out + ".voxflow-tmp/")

    seen_before_delete = []
    delete = voxflow.runner.delete_temporary

    def spy(cfg, run_id):
        if run_id == "gsrun":
            seen_before_delete.append(len(gcs.names(temporary_url(cfg, run_id) + "/")))
        delete(cfg, run_id)
    monkeypatch.setattr(voxflow.runner, "delete_temporary", spy)

    assert main(["run", str(on_gs), "--quiet", "--run-id", "gsrun"]) == 0, gcs.tail()
    assert seen_before_delete == [partials]            # the partials lived in the bucket ...
    assert gcs.names(gs_out + ".voxflow-tmp/") == []   # ... and are gone
    assert main(["run", str(local), "--quiet"]) == 0
    for mip in (0, 1):
        got, want = Volume(gs_out, mip), Volume(f"file://{tmp_path}/out", mip)
        assert got.bounds == want.bounds
        a, b = got.read(got.bounds), want.read(want.bounds)
        assert a.dtype == np.float32 and a.any()
        assert np.abs(a - b).max() <= 1e-6, (mip, np.abs(a - b).max())
    assert not (tmp_path / "gs.voxflow-tmp").exists()  # nothing went to a local folder


def test_crop_run_on_gs_equals_whole_array(tmp_path, gcs):
    img = (np.random.default_rng(0).random((1, 9, 40, 50)) * 255).astype(np.uint8)
    offset = (5, 7, 3)
    gs_in, gs_out = gcs.path("img"), gcs.path("crop")
    _write_layer(gs_in, img, offset)
    net = Pointwise().eval()
    torch.jit.script(net).save(str(tmp_path / "m.pt"))
    bbox = Box((6, 9, 4), (52, 45, 12))
    cfg = write_config(tmp_path / "run.yaml", input=gs_in, output=gs_out,
                       bbox={"start": list(bbox.start), "stop": list(bbox.stop)},
                       model={"path": "m.pt", "input_patch": [16, 16, 4], "output_channels": 2},
                       inference={"chunk": [32, 32, 8], "patch_overlap": [4, 4, 1],
                                  "blend": "crop"},
                       storage_chunk=[16, 16, 4], downsample={"mips": 0})
    assert len(plan(load_config(cfg)).grid) >= 4
    assert main(["run", str(cfg), "--quiet"]) == 0, gcs.tail()
    with torch.no_grad():
        want = net(torch.from_numpy(img[None].astype(np.float32) / 255.0))[0].numpy()
    out = Volume(gs_out)
    assert out.bounds == Box(offset, (55, 47, 12))
    got = out.read(out.bounds)
    inside = (slice(None), *bbox.zyx_slices(offset))
    assert np.abs(got[inside] - want[inside]).max() <= 1e-6
    got[inside] = 0
    assert not got.any()                               # nothing outside the bbox written
    assert gcs.names(gs_out + ".voxflow-tmp/") == []


@pytest.mark.parametrize("command", ["validate", "plan", "run"])
def test_missing_gs_input_is_refused_before_writing(tmp_path, gcs, capsys, command):
    torch.jit.script(Pointwise().eval()).save(str(tmp_path / "m.pt"))
    missing, out = gcs.path("no-such-layer"), gcs.path("out")
    cfg = write_config(tmp_path / "bad.yaml", input=missing, output=out,
                       model={"path": "m.pt", "input_patch": [16, 16, 4], "output_channels": 2},
                       inference={"chunk": [32, 32, 8]}, storage_chunk=[16, 16, 4])
    before = gcs.names(f"gs://{gcs.bucket}/")
    assert main([command, str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("voxflow: error: input:") and missing in err, err
    assert gcs.names(f"gs://{gcs.bucket}/") == before  # nothing written anywhere
    assert not os.path.exists(tmp_path / "out")
