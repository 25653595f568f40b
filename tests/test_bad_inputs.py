"""Bad inputs, catalogued: every row of docs/bad-inputs.md is produced here and the exact
error a user sees is asserted (the doc's table is rendered from `CASES`, and a test keeps the
two equal: `python tests/test_bad_inputs.py` rewrites the doc).

Where a case is refused says what it may have changed: a `config` or `plan` refusal is
`voxflow run` exiting 2 with one line and nothing written anywhere (every file under the
test's folder is the same before and after); a `task` refusal fails only that task (the
run's other tasks are done, `voxflow run` exits 1 naming it); a `message` refusal is the
worker failing that message (a dead letter with the error), nothing written for it.
"""
from __future__ import annotations

import copy
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
import torch
import yaml

from voxflow.cli import main
from voxflow.config import load_config
from voxflow.geometry import Box
from voxflow.messages import encode
from voxflow.pipeline import plan
from voxflow.queues import open_queue
from voxflow.runner import register
from voxflow.stages import StageCache
from voxflow.worker import JsonLog, Worker

sys.path.insert(0, str(Path(__file__).parent))
from conftest import INLINE, Pointwise, make_layer  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md"
SCALE = "8_8_40"                     # the input layer's mip-0 folder
GOOD_BOX = [[0, 0, 0], [32, 32, 8]]  # task 0's box
TASK1_BOX = Box((32, 0, 0), (64, 32, 8))


@dataclass
class Setup:
    """A good run — a 64x64x8 uint8 layer in 16x16x8 chunks, a pointwise TorchScript model,
    crop mode, 4 tasks of 32x32x8 — that a case then breaks."""

    dir: Path
    config: dict

    def set(self, dotted: str, value) -> None:
        node = self.config
        *path, last = dotted.split(".")
        for key in path:
            node = node.setdefault(key, {})
        if value is DELETE:
            del node[last]
        else:
            node[last] = value

    def write(self, name: str, data: str | bytes) -> Path:
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
        return path

    def python_model(self, source: str, name: str = "net.py") -> None:
        self.write(name, source)
        self.set("model.path", name)


DELETE = object()


@dataclass(frozen=True)
class Case:
    id: str
    group: str                    # config, layer, model, message, url
    what: str                     # the bad input, as the doc names it
    at: str                       # where it is refused: config, plan, task, message
    error: str                    # what the user sees (the test's folder written <dir>)
    make: Callable[[Setup], None]
    task: int = 0                 # task cases: the task that fails
    body: Optional[str] = None    # message cases: what is published (index, stage from it)
    stage: str = "inference"
    index: int = 0
    command: str = "run"          # config/plan cases: the voxflow command that refuses it


def cfg(dotted: str, value) -> Callable[[Setup], None]:
    return lambda s: s.set(dotted, value)


def both(*makes: Callable[[Setup], None]) -> Callable[[Setup], None]:
    def make(s: Setup) -> None:
        for m in makes:
            m(s)
    return make


def pymodel(source: str, name: str = "net.py") -> Callable[[Setup], None]:
    return lambda s: s.python_model(source, name)


def write(name: str, data: str | bytes) -> Callable[[Setup], None]:
    return lambda s: s.write(name, data)


def nothing(s: Setup) -> None:
    pass


NET = """
import torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 1)

    def forward(self, x):
        return torch.sigmoid(self.conv(x))
"""

# a model that misbehaves only on some inputs passes plan (a zero patch) and fails the tasks
# whose chunk holds bright voxels: task 1 of the layer below (the others are dark)
ON_BRIGHT = """
import torch

class Net(torch.nn.Module):
    def forward(self, x):
        y = torch.sigmoid(x).repeat(1, 2, 1, 1, 1)
        if bool((x > 0.9).any()):
            {}
        return y
"""


def _corrupt_info(s: Setup) -> None:
    s.write("img/info", "{\"type\": \"image\", \"scales\": [")


def _info_without_scales(s: Setup) -> None:
    info = json.loads((s.dir / "img" / "info").read_text())
    del info["scales"]
    s.write("img/info", json.dumps(info))


def _truncate_chunk(s: Setup) -> None:
    chunk = s.dir / "img" / SCALE / "32-48_0-16_0-8"
    chunk.write_bytes(chunk.read_bytes()[:100])


def _gzip_garbage(s: Setup) -> None:
    chunk = s.dir / "img" / SCALE / "32-48_0-16_0-8"
    chunk.unlink()
    s.write(f"img/{SCALE}/32-48_0-16_0-8.gz", b"\x1f\x8b\x08\x00garbage, not gzip")


def _delete_chunk(s: Setup) -> None:
    (s.dir / "img" / SCALE / "32-48_0-16_0-8").unlink()


def _existing_output(**change) -> Callable[[Setup], None]:
    def make(s: Setup) -> None:
        layer = dict(num_channels=2, dtype="float32", size=(64, 64, 8), resolution=(8, 8, 40))
        layer.update(change)
        from voxflow.volume import Volume
        Volume.create(f"file://{s.dir}/out", voxel_offset=(0, 0, 0), chunk=(16, 16, 8),
                      **layer)
    return make


def _two_channel_input(s: Setup) -> None:
    import shutil
    shutil.rmtree(s.dir / "img")
    make_layer(s.dir / "img", np.zeros((2, 8, 64, 64), np.uint8), chunk=(16, 16, 8))


def _not_a_state_dict(s: Setup) -> None:
    s.python_model(NET)
    s.write("w.pt", b"this is no pickle")
    s.set("model.weights", "w.pt")


class _RunsCode:
    """Unpickled, it would run a shell command that writes a file (the test's file
    comparison would see it): `weights_only` refuses the pickle before."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.target}",)


def _pickled_code(s: Setup) -> None:
    import pickle
    s.python_model(NET)
    s.write("w.pt", pickle.dumps(_RunsCode(s.dir / "pwned"), protocol=2))
    s.set("model.weights", "w.pt")


def _weights_do_not_fit(s: Setup) -> None:
    from safetensors.torch import save_file
    s.python_model(NET)
    save_file({"conv.weight": torch.zeros(3, 1, 1, 1, 1), "conv.bias": torch.zeros(3)},
              str(s.dir / "w.safetensors"))
    s.set("model.weights", "w.safetensors")


def _no_credentials(s: Setup) -> None:
    s.set("input", "gs://voxflow-no-credentials/img")


CASES: list[Case] = [
    # -- configs: what the config file says (refused before any I/O) -------------------------
    Case("config-missing-file", "config", "the config file does not exist", "config",
         "config: file <dir>/missing.yaml not found", nothing),
    Case("config-invalid-yaml", "config", "the file is not YAML", "config",
         "config: <dir>/run.yaml is not valid YAML: while parsing a flow sequence in "
         "\"<unicode string>\", line 1, column 8: input: [img ^ expected ',' or ']', but got "
         "'<stream end>' in \"<unicode string>\", line 2, column 1: ^", nothing),
    Case("config-not-a-mapping", "config", "the YAML is a list, not keys", "config",
         "config: expected a mapping of keys, got list", nothing),
    Case("config-unknown-key", "config", "an unknown key (a typo)", "config",
         "inference.chunks: unknown key", cfg("inference.chunks", [32, 32, 8])),
    Case("config-missing-input", "config", "`input` missing", "config",
         "input: is required", cfg("input", DELETE)),
    Case("config-empty-output", "config", "`output` empty", "config",
         "output: must not be empty", cfg("output", " ")),
    Case("config-output-is-input", "config", "`output` is the input layer", "config",
         "output: must differ from input", cfg("output", "img")),
    Case("config-negative-mip", "config", "`mip` negative", "config",
         "mip: Input should be greater than or equal to 0", cfg("mip", -1)),
    Case("config-empty-bbox", "config", "`bbox` empty on an axis", "config",
         "bbox: stop [32, 8, 8] must exceed start [0, 8, 0] on every axis",
         cfg("bbox", {"start": [0, 8, 0], "stop": [32, 8, 8]})),
    Case("config-chunk-words", "config", "`inference.chunk` not numbers", "config",
         "inference.chunk: Input should be a valid list", cfg("inference.chunk", "big")),
    Case("config-chunk-two-values", "config", "`inference.chunk` of 2 values", "config",
         "inference.chunk: List should have at least 3 items after validation, not 2",
         cfg("inference.chunk", [32, 32])),
    Case("config-chunk-zero", "config", "`inference.chunk` zero", "config",
         "inference.chunk: Input should be greater than 0", cfg("inference.chunk", [0, 32, 8])),
    Case("config-chunk-unaligned", "config", "`inference.chunk` not a multiple of "
         "`storage_chunk`", "config", "inference.chunk: [24, 32, 8] must be a multiple of "
         "storage_chunk [16, 16, 8] along x", cfg("inference.chunk", [24, 32, 8])),
    Case("config-overlap-too-large", "config", "`inference.patch_overlap` >= the output "
         "patch", "config", "inference.patch_overlap: [16, 0, 0] must be smaller than "
         "output_patch [16, 16, 8] along x", cfg("inference.patch_overlap", [16, 0, 0])),
    Case("config-output-patch-larger", "config", "`model.output_patch` larger than the "
         "input patch", "config", "model.output_patch: [18, 16, 8] is larger than input_patch "
         "[16, 16, 8] along x", cfg("model.output_patch", [18, 16, 8])),
    Case("config-output-patch-odd", "config", "`model.output_patch` off-centre (odd "
         "margin)", "config", "model.output_patch: input_patch - output_patch must be even "
         "along x (the output is the input patch's centre)",
         cfg("model.output_patch", [13, 16, 8])),
    Case("config-patch-too-large", "config", "`model.input_patch` larger than a chunk plus "
         "margins", "config", "model.input_patch: [80, 16, 8] is larger than chunk [32, 32, "
         "8] plus twice the margin [0, 0, 0] along x", cfg("model.input_patch", [80, 16, 8])),
    Case("config-precision", "config", "`model.precision` unknown", "config",
         "model.precision: Input should be 'fp32', 'bf16' or 'fp16'",
         cfg("model.precision", "fp8")),
    Case("config-output-dtype", "config", "`output_dtype` unknown", "config",
         "output_dtype: Input should be 'float32', 'float16' or 'uint8'",
         cfg("output_dtype", "int7")),
    Case("config-batch-size", "config", "`inference.batch_size` zero", "config",
         "inference.batch_size: Input should be greater than 0, or Input should be 'auto'",
         cfg("inference.batch_size", 0)),
    Case("config-std-zero", "config", "`model.normalize.std` zero", "config",
         "model.normalize.std: Input should be greater than 0",
         cfg("model.normalize", {"std": 0})),
    Case("config-factor", "config", "`downsample.factor` not a pyramid factor", "config",
         "downsample.factor: [3, 3, 1] is not one of [2, 2, 1], [2, 2, 2]",
         cfg("downsample.factor", [3, 3, 1])),
    Case("config-mips", "config", "`downsample.mips` beyond 16", "config",
         "downsample.mips: Input should be less than or equal to 16",
         cfg("downsample.mips", 17)),
    Case("config-max-attempts", "config", "`queue.max_attempts` zero", "config",
         "queue.max_attempts: Input should be greater than 0", cfg("queue.max_attempts", 0)),
    Case("config-lease", "config", "`queue.lease_seconds` negative", "config",
         "queue.lease_seconds: Input should be greater than 0",
         cfg("queue.lease_seconds", -5)),
    Case("config-retention", "config", "`queue.retention_seconds` under Pub/Sub's minimum",
         "config", "queue.retention_seconds: Input should be greater than or equal to 600",
         cfg("queue.retention_seconds", 60)),
    Case("config-group-min-max", "config", "`workers.*.min` above `max`", "config",
         "workers.downsample: min 3 exceeds max 2",
         cfg("workers.downsample", {"group": "local://2", "min": 3})),
    Case("config-gce-without-max", "config", "a gce:// group without `max`", "config",
         "workers.inference.max: is required for a gce:// group (the most VMs it may start); "
         "workers.inference.gce: is required for a gce:// group (at least gce.image, the "
         "worker container image)", cfg("workers.inference", "gce://my-project/us-east1-b/g")),
    # -- URLs ---------------------------------------------------------------------------------
    Case("url-input-scheme", "url", "an input URL of an unsupported scheme", "config",
         "input: ftp://host/img: unsupported scheme ftp:// (use file://, gs://, s3://, "
         "http://, https://, or a local path)", cfg("input", "ftp://host/img")),
    Case("url-output-scheme", "url", "an output URL voxflow cannot write", "config",
         "output: https://host/out: unsupported scheme https:// (use file://, gs://, s3://, or "
         "a local path)", cfg("output", "https://host/out")),
    Case("url-temporary-scheme", "url", "an `inference.temporary` URL voxflow cannot write",
         "config", "inference.temporary: http://host/tmp: unsupported scheme http:// (use "
         "file://, gs://, s3://, or a local path)",
         cfg("inference.temporary", "http://host/tmp")),
    Case("url-queue-scheme", "url", "a queue URL of an unknown kind", "config",
         "queue.url: 'redis://localhost/0' is not a known queue URL (sqlite:///path/queue.db "
         "or pubsub://PROJECT/PREFIX?ledger=gs://bucket/path)",
         cfg("queue", "redis://localhost/0")),
    Case("url-group-scheme", "url", "a worker group URL of an unknown kind", "config",
         "workers.inference.group: 'k8s://cluster' is not a known worker group URL "
         "(local://N, local://auto, gce://PROJECT/ZONE/GROUP or external://)",
         cfg("workers.inference", "k8s://cluster")),
    Case("url-gce-local-layer", "url", "a gce:// group with a local layer", "config",
         "queue.url: workers.inference.group runs workers on Compute Engine VMs, which cannot "
         "reach sqlite://<dir>/queue.db: use pubsub://PROJECT/PREFIX?ledger=gs://bucket/path",
         cfg("workers.inference", {"group": "gce://my-project/us-east1-b/g", "max": 2,
                                   "gce": {"image": "img"}})),
    Case("url-no-credentials", "url", "a gs:// input without Google credentials", "plan",
         "input: cannot open gs://voxflow-no-credentials/img: no Google credentials "
         "(DefaultCredentialsError: File <dir>/no-such-key.json was not found.): set "
         "GOOGLE_APPLICATION_CREDENTIALS to a service account key, run `gcloud auth "
         "application-default login`, or use the workers' service account",
         _no_credentials, command="plan"),
    # -- layers -------------------------------------------------------------------------------
    Case("layer-missing", "layer", "no layer at `input`", "plan",
         "input: no precomputed layer at file://<dir>/nowhere", cfg("input", "nowhere")),
    Case("layer-corrupt-info", "layer", "the input's `info` is not JSON", "plan",
         "input: the info of file://<dir>/img is not valid JSON (JSONDecodeError: unexpected "
         "end of data: line 1 column 30 (char 29))", _corrupt_info),
    Case("layer-info-incomplete", "layer", "the input's `info` lacks `scales`", "plan",
         "input: the info of file://<dir>/img is not a precomputed info (KeyError: "
         "'scales')", _info_without_scales),
    Case("layer-mip-missing", "layer", "`mip` the input does not have", "plan",
         "mip: 3 is not a mip of the input (it has mips 0..0)", cfg("mip", 3)),
    Case("layer-bbox-outside", "layer", "`bbox` not inside the input's bounds", "plan",
         "bbox: [0,0,0 : 80,64,8) is not inside the input's bounds [0,0,0 : 64,64,8) at mip 0",
         cfg("bbox", {"start": [0, 0, 0], "stop": [80, 64, 8]})),
    Case("layer-input-channels", "layer", "an input with more channels than the model reads",
         "plan", "model.input_patch: the model failed on a zero batch of 2 channel(s) (the "
         "input layer's) x [16, 16, 8]: Given groups=1, weight of size [2, 1, 1, 1, 1], "
         "expected input[1, 2, 8, 16, 16] to have 1 channels, but got 2 channels instead",
         _two_channel_input),
    Case("layer-output-dtype", "layer", "an existing output of another dtype", "plan",
         "output: existing layer file://<dir>/out has dtype uint8, this run needs float32",
         _existing_output(dtype="uint8")),
    Case("layer-output-channels", "layer", "an existing output of another channel count",
         "plan", "output: existing layer file://<dir>/out has num_channels 3, this run needs "
         "2", _existing_output(num_channels=3)),
    Case("layer-output-bounds", "layer", "an existing output of other bounds", "plan",
         "output: existing layer file://<dir>/out has bounds [0,0,0 : 32,64,8), this run "
         "needs [0,0,0 : 64,64,8)", _existing_output(size=(32, 64, 8))),
    Case("layer-missing-chunk", "layer", "a chunk file of the input is missing", "task",
         "MissingChunk: chunk file://<dir>/img/8_8_40/32-48_0-16_0-8 of the input is missing "
         "(reading [32,0,0 : 64,32,8)); `input_missing: zeros` reads missing chunks "
         "as 0", _delete_chunk, task=1),
    Case("layer-truncated-chunk", "layer", "a chunk file of the input is truncated", "task",
         "CorruptChunk: chunk file://<dir>/img/8_8_40/32-48_0-16_0-8 of the input cannot be "
         "decoded (reading [32,0,0 : 64,32,8)): ValueError: cannot reshape array of size 100 "
         "into shape (16,16,8,1)", _truncate_chunk, task=1),
    Case("layer-corrupt-gzip-chunk", "layer", "a gzip chunk file of the input is corrupt",
         "task", "CorruptChunk: chunk file://<dir>/img/8_8_40/32-48_0-16_0-8 of the input "
         "cannot be decoded (reading [32,0,0 : 64,32,8)): ...", _gzip_garbage,
         task=1),
    # -- models -------------------------------------------------------------------------------
    Case("model-missing", "model", "`model.path` does not exist", "plan",
         "model.path: file <dir>/gone.pt not found", cfg("model.path", "gone.pt")),
    Case("model-weights-missing", "model", "`model.weights` does not exist", "plan",
         "model.weights: file <dir>/gone.safetensors not found",
         both(pymodel(NET), cfg("model.weights", "gone.safetensors"))),
    Case("model-unknown-format", "model", "a model file of an unknown format", "plan",
         "model.path: unknown model format '.onnx': use .pt2, .pt, .pth, .ts, .jit, "
         ".torchscript or .py", both(write("m.onnx", b"onnx"), cfg("model.path", "m.onnx"))),
    Case("model-not-torchscript", "model", "a `.pt` that is not a model", "plan",
         "model.path: junk.pt is not a TorchScript file: PytorchStreamReader failed reading "
         "zip archive: not a ZIP archive...",
         both(write("junk.pt", b"not a model"), cfg("model.path", "junk.pt"))),
    Case("model-not-export", "model", "a `.pt2` that is not an exported program", "plan",
         "model.path: junk.pt2 is not a torch.export program: ...",
         both(write("junk.pt2", b"not a model"), cfg("model.path", "junk.pt2"))),
    Case("model-py-raises", "model", "a `.py` model that raises on import", "plan",
         "model.path: net.py raised on import: ModuleNotFoundError: No module named "
         "'not_installed'", pymodel("import not_installed\n")),
    Case("model-py-syntax", "model", "a `.py` model that is not Python", "plan",
         "model.path: net.py raised on import: SyntaxError: invalid syntax (net.py, line 1)",
         pymodel("def (\n")),
    Case("model-py-no-class", "model", "a `.py` with no nn.Module", "plan",
         "model.entry: net.py defines 0 public nn.Module classes and no build_model(); name "
         "one with model.entry", pymodel("x = 1\n")),
    Case("model-entry-missing", "model", "`model.entry` the file does not define", "plan",
         "model.entry: net.py defines no 'Missing'",
         both(pymodel(NET), cfg("model.entry", "Missing"))),
    Case("model-entry-raises", "model", "a `.py` factory that raises", "plan",
         "model.entry: build_model() of net.py raised: RuntimeError: no GPU here",
         pymodel("def build_model():\n    raise RuntimeError('no GPU here')\n")),
    Case("model-weights-not-state-dict", "model", "`model.weights` not a state dict", "plan",
         "model.weights: w.pt is not a readable state dict (a .safetensors file, or a "
         "torch.save of tensors only): ...", _not_a_state_dict),
    Case("model-weights-pickled-code", "model", "`model.weights` a pickle that would run "
         "code", "plan", "model.weights: w.pt is not a readable state dict (a .safetensors "
         "file, or a torch.save of tensors only): UnpicklingError: Weights only load "
         "failed...", _pickled_code),
    Case("model-weights-do-not-fit", "model", "weights that do not fit the module", "plan",
         "model.weights: do not fit net.py: Error(s) in loading state_dict for Net: size "
         "mismatch for conv.weight: copying a param with shape torch.Size([3, 1, 1, 1, 1]) "
         "from checkpoint, the shape in current model is torch.Size([2, 1, 1, 1, 1]). size "
         "mismatch for conv.bias: copying a param with shape torch.Size([3]) from checkpoint, "
         "the shape...", _weights_do_not_fit),
    Case("model-output-channels", "model", "a model with other output channels than "
         "declared", "plan", "model.output_channels: the model outputs 2 channels, the config "
         "declares 3", cfg("model.output_channels", 3)),
    Case("model-output-patch", "model", "a model whose output patch is not the declared one",
         "plan", "model.output_patch: the model outputs a [14, 14, 8] patch for input [16, 16, "
         "8] (batch of 1); expected [16, 16, 8] or the input patch",
         pymodel("import torch\n\nclass Net(torch.nn.Module):\n    def forward(self, x):\n"
                 "        return x[..., 1:-1, 1:-1].repeat(1, 2, 1, 1, 1)\n")),
    Case("model-int-output", "model", "a model returning integers", "plan",
         "model.path: the model returned dtype int64; voxflow blends floating-point outputs "
         "(probabilities)", pymodel("import torch\n\nclass Net(torch.nn.Module):\n    def "
                                    "forward(self, x):\n        return x.repeat(1, 2, 1, 1, "
                                    "1).long()\n")),
    Case("model-not-a-tensor", "model", "a model returning a dict", "plan",
         "model.path: the model returned a dict, not a tensor",
         pymodel("import torch\n\nclass Net(torch.nn.Module):\n    def forward(self, x):\n"
                 "        return {'y': x}\n")),
    Case("model-nan-on-some-input", "model", "a model returning NaN on some chunks", "task",
         "ModelOutputError: inference task 1 (box [32,0,0 : 64,32,8)): the model "
         "returned NaN or Inf (16384 of 16384 values in a batch of 4 patches)",
         pymodel(ON_BRIGHT.format("y = torch.where(x > 0.9, float('nan'), y)")), task=1),
    Case("model-inf-on-some-input", "model", "a model returning Inf on some chunks", "task",
         "ModelOutputError: inference task 1 (box [32,0,0 : 64,32,8)): the model "
         "returned NaN or Inf (16384 of 16384 values in a batch of 4 patches)",
         pymodel(ON_BRIGHT.format("y = y / 0.0")), task=1),
    Case("model-batch-shape", "model", "a model whose output batch is not its input's",
         "task", "ModelOutputError: inference task 1 (box [32,0,0 : 64,32,8)): the "
         "model returned a batch of 1 for a batch of 4",
         pymodel(ON_BRIGHT.format("y = y[:1]")), task=1),
    Case("model-dtype-changes", "model", "a model whose dtype changes with the input", "task",
         "ModelOutputError: inference task 1 (box [32,0,0 : 64,32,8)): the model "
         "returned dtype bool; voxflow blends floating-point outputs (probabilities)",
         pymodel(ON_BRIGHT.format("y = y > 0.5")), task=1),
    Case("model-raises-on-some-input", "model", "a model raising on some chunks", "task",
         "ValueError: saturated voxels in this patch",
         pymodel(ON_BRIGHT.format("raise ValueError('saturated voxels in this patch')")),
         task=1),
    # -- queues and messages ------------------------------------------------------------------
    Case("message-not-json", "message", "a message body that is not JSON", "message",
         "MalformedMessage: malformed task message (not JSON: Expecting property name "
         "enclosed in double quotes: line 1 column 2 (char 1))", nothing, body="{not json"),
    Case("message-not-object", "message", "a message that is a JSON list", "message",
         "MalformedMessage: malformed task message (a JSON list, not an object)", nothing,
         body="[1, 2, 3]"),
    Case("message-old-version", "message", "a message of another version", "message",
         "MalformedMessage: task message version 0 is not one this worker reads (version 1): "
         "a newer or older voxflow published it", nothing,
         body=json.dumps({"v": 0, "run": "RUN", "stage": "inference", "index": 0,
                          "box": GOOD_BOX})),
    Case("message-10-mb", "message", "a message of 10 MB", "message",
         "MalformedMessage: malformed task message (10485760 bytes; a task message is at "
         "most 4096)", nothing, body="x" * (10 << 20)),
    Case("message-missing-field", "message", "a message without `box`", "message",
         "MalformedMessage: malformed task message (box: Field required)", nothing,
         body=json.dumps({"v": 1, "run": "RUN", "stage": "inference", "index": 0})),
    Case("message-unknown-stage", "message", "a message naming an unknown stage", "message",
         "UnknownStage: unknown stage 'rm -rf': this run's stages are inference", nothing,
         body=json.dumps({"v": 1, "run": "RUN", "stage": "rm -rf", "index": 0,
                          "box": GOOD_BOX}), stage="rm -rf"),
    Case("message-box-outside-plan", "message", "a message whose box is not its task's",
         "message", "MalformedMessage: box [0,0,0 : 640,640,80) is not task 0's box "
         "[0,0,0 : 32,32,8) in the run's plan", nothing,
         body=json.dumps({"v": 1, "run": "RUN", "stage": "inference", "index": 0,
                          "box": [[0, 0, 0], [640, 640, 80]]})),
    Case("message-index-outside-plan", "message", "a message whose task index is not in the "
         "plan", "message", "TaskOutsidePlan: task index 99 is outside stage inference's 4 "
         "task(s) in the run's plan", nothing,
         body=json.dumps({"v": 1, "run": "RUN", "stage": "inference", "index": 99,
                          "box": GOOD_BOX}), index=99),
    Case("message-unknown-run", "message", "a message of a run the queue does not know",
         "message", "KeyError: \"run 'other-run' is not registered in sqlite://<dir>/"
         "queue.db\"", nothing, body=json.dumps({"v": 1, "run": "other-run",
                                                 "stage": "inference", "index": 0,
                                                 "box": GOOD_BOX})),
]


# -- running a case -------------------------------------------------------------------------

def _setup(tmp_path: Path) -> Setup:
    img = np.zeros((1, 8, 64, 64), np.uint8)
    img[:, :, :32, 32:] = 250                    # task 1's chunk is bright, the others dark
    make_layer(tmp_path / "img", img, chunk=(16, 16, 8))
    torch.jit.script(Pointwise(1, 2).eval()).save(str(tmp_path / "model.pt"))
    config = {"input": "img", "output": "out",
              "model": {"path": "model.pt", "input_patch": [16, 16, 8], "output_channels": 2},
              "inference": {"chunk": [32, 32, 8], "patch_overlap": [0, 0, 0], "blend": "crop"},
              "storage_chunk": [16, 16, 8], "downsample": {"mips": 0},
              "queue": {"url": f"sqlite://{tmp_path}/queue.db", "max_attempts": 1},
              "workers": dict(INLINE)}
    return Setup(tmp_path, config)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _matches(got: str, want: str) -> bool:
    """Equal, where `...` in `want` stands for any text (a library's message that varies)."""
    return re.fullmatch(".*".join(map(re.escape, want.split("..."))), got) is not None


def _run_config(case: Case, s: Setup) -> Path:
    path = s.dir / "run.yaml"
    if case.id == "config-invalid-yaml":
        path.write_text("input: [img\n")
    elif case.id == "config-not-a-mapping":
        path.write_text("- input\n- output\n")
    elif case.id == "config-missing-file":
        return s.dir / "missing.yaml"
    else:
        path.write_text(yaml.safe_dump(s.config, sort_keys=False))
    return path


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    """Google's libraries as on a machine without credentials (no emulator, a key file that
    is not there): what `url-no-credentials` sees."""
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-key.json"))


@pytest.mark.parametrize("case", [c for c in CASES if c.at in ("config", "plan")],
                         ids=lambda c: c.id)
def test_refused_before_anything_is_written(case, tmp_path, capsys, request):
    s = _setup(tmp_path)
    case.make(s)
    if case.id == "url-no-credentials":
        request.getfixturevalue("no_credentials")
    path = _run_config(case, s)
    before = _files(tmp_path)
    assert main([case.command, str(path)] + (["--quiet"] if case.command == "run" else [])) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    shown = err.removeprefix("voxflow: error: ").replace(str(tmp_path), "<dir>")
    assert _matches(shown, case.error), shown
    field = case.error.split(":", 1)[0]
    assert shown.startswith(f"{field}: ")                # the field is named first
    assert _files(tmp_path) == before                    # nothing written anywhere
    assert not (tmp_path / "out").exists() or case.id.startswith("layer-output")


@pytest.mark.parametrize("case", [c for c in CASES if c.at == "task"], ids=lambda c: c.id)
def test_refused_by_one_task_only(case, tmp_path, capsys):
    s = _setup(tmp_path)
    case.make(s)
    s.set("queue.max_attempts", 2)                       # retried, then reported dead
    path = _run_config(case, s)
    assert main(["run", str(path), "--quiet", "--run-id", "bad"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1].replace(str(tmp_path), "<dir>")
    head = f"voxflow: error: run bad: 1 task(s) of stage inference are dead: " \
           f"#{case.task} after 2 attempt(s): "
    assert err.startswith(head), err
    assert _matches(err.removeprefix(head), case.error), err
    q = open_queue(s.config["queue"]["url"], readonly=True)
    stats = q.stats("bad")["inference"]
    assert (stats.done, stats.dead, stats.total) == (3, 1, 4)     # only that task failed
    (dead,) = q.dead_letters("bad")
    assert dead.index == case.task
    q.close()
    # the failed task wrote nothing: none of its storage chunks exist (NaN never written)
    written = {p.name for p in (tmp_path / "out").rglob("*-*_*-*_*-*")}
    assert len(written) == 12 and not any(n.startswith(("32-48_0-16", "48-64_0-16",
                                                        "32-48_16-32", "48-64_16-32"))
                                          for n in written), written


@pytest.fixture
def registered(tmp_path):
    s = _setup(tmp_path)
    config = load_config(_run_config(Case("", "", "", "", "", nothing), s))
    run_id, _ = register(config, plan(config), "RUN")
    return s, config, run_id


@pytest.mark.parametrize("case", [c for c in CASES if c.at == "message"], ids=lambda c: c.id)
def test_a_bad_message_fails_only_itself(case, registered):
    s, config, run_id = registered
    q = open_queue(config.queue.url)
    body = case.body.replace('"RUN"', json.dumps(run_id))
    run = "other-run" if case.id == "message-unknown-run" else run_id
    q.publish(run, case.stage, "inference", [(case.index, body)])
    q.publish(run_id, "inference", "inference", [(1, encode(run_id, "inference", 1,
                                                            TASK1_BOX))])  # a good one
    worker = Worker(q, StageCache(q), ["inference"], worker_id="w",
                    log=JsonLog("w", open(s.dir / "w.log", "w")))
    worker.run(exit_when_idle=0.3)
    worker.shutdown()
    worker.log.stream.close()
    dead = q.dead_letters(run)
    assert [d.index for d in dead] == [case.index]
    shown = dead[0].error.splitlines()[0].replace(str(s.dir), "<dir>")
    assert _matches(shown, case.error), shown
    assert q.stats(run_id)["inference"].done == 1             # the good task still ran
    out = s.dir / "out"
    written = {p.name for p in out.rglob("*-*_*-*_*-*")}
    assert written == {"32-48_0-16_0-8", "48-64_0-16_0-8", "32-48_16-32_0-8",
                       "48-64_16-32_0-8"}                      # task 1's, nothing else
    q.close()


# -- the doc --------------------------------------------------------------------------------

GROUPS = {"config": "Configs", "url": "URLs", "layer": "Layers", "model": "Models",
          "message": "Queues and messages"}
WHERE = {"config": "config (exit 2)", "plan": "plan (exit 2)",
         "task": "the task (run exits 1)", "message": "the worker (dead letter)"}


def render_doc() -> str:
    """docs/bad-inputs.md, from `CASES`."""
    lines = [
        "# Bad inputs, catalogued",
        "",
        "Every row is produced by `tests/test_bad_inputs.py` (the test id is the first "
        "column), which asserts the error shown here (`<dir>`: the config's folder; `...`: a "
        "library's text that varies). This file is generated from the test's list of cases "
        "(`python tests/test_bad_inputs.py` rewrites it; a test fails when they differ).",
        "",
        "Where it is refused:",
        "",
        "- **config / plan** — `voxflow run`, `voxflow plan` and `voxflow validate` print "
        "`voxflow: error: <field>: <message>` (one line, the field first) and exit 2; the "
        "Airflow plan task fails with the same text. Nothing has been written: no output "
        "layer, no queue, no run (the test compares every file before and after).",
        "- **the task** — found when a task reads its input or runs the model: that task "
        "fails (retried up to `queue.max_attempts`, then a dead letter); the other tasks "
        "finish, and `voxflow run` exits 1 with `voxflow: error: run RUN: N task(s) of "
        "stage S are dead: #INDEX after K attempt(s): <error>` (`voxflow status RUN` shows "
        "the same). Nothing of the failed task is written (a model's NaN never reaches the "
        "output).",
        "- **the worker** — a message the worker cannot take: it fails that message like a "
        "task (never crashing), so it ends in dead letters with the error after "
        "`max_attempts`; nothing is written for it.",
        "",
        f"{len(CASES)} cases.",
    ]
    for group, title in GROUPS.items():
        lines += ["", f"## {title}", "", "| case | bad input | refused by | what the user "
                  "sees |", "|---|---|---|---|"]
        for c in (c for c in CASES if c.group == group):
            error = c.error.replace("|", "\\|")
            where = WHERE[c.at] + (f", task #{c.task}" if c.at == "task" else "")
            lines.append(f"| `{c.id}` | {c.what} | {where} | `{error}` |")
    return "\n".join(lines) + "\n"


def test_the_doc_is_the_table_of_cases():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)
    assert DOC.read_text() == render_doc(), "run: python tests/test_bad_inputs.py"


if __name__ == "__main__":
    DOC.write_text(render_doc())
    print(f"wrote {DOC} ({len(CASES)} cases)")
