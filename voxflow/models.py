"""Loading ConvNets: torch.export programs, TorchScript files, or a Python file plus weights.

`Model` hides the format: it takes a (n, c, z, y, x) float32 batch on its device and returns a
float32 batch, padding the batch when an exported program was traced with a static batch size
(or compiled for one), and autocasting to bf16/fp16 on CUDA with channels_last_3d.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import os
import re
import sys
import time
import types
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .config import ConfigError, ModelConfig, voxflow_home
from .identity import digest_model_bytes, read_model_files

TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".jit", ".torchscript")


class ModelOutputError(RuntimeError):
    """The model's output is not what the run declared, or not finite: the task fails (it is
    never written) and `field` names the config key it contradicts. A stage adds the chunk
    (`on_chunk`); plan's `Model.check` turns it into a `ConfigError`."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(message)

    def on_chunk(self, stage: str, index: int, box) -> "ModelOutputError":
        return ModelOutputError(self.field, f"{stage} task {index} (box {box}): "
                                f"{self.message}")


def _one_line(exc: BaseException, limit: int = 300) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:limit]


def _model_error(exc: BaseException, limit: int = 300) -> str:
    """The model's own error in one line; of a TorchScript error (its serialized code and
    traceback, then the error) only the error."""
    text = str(exc)
    if "TorchScript interpreter" in text:
        text = [line for line in text.splitlines() if line.strip()][-1]
        text = text.split(": ", 1)[1] if re.match(r"^\w+(Error|Exception): ", text) else text
    return " ".join(text.split())[:limit]


def pick_device(device: str) -> torch.device:
    """`auto` means CUDA when there is one."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("inference.device", "cuda was asked for but no CUDA device is visible")
    return torch.device(device)


def to_host(t: torch.Tensor) -> Callable[[], np.ndarray]:
    """Start copying a device tensor to host memory; the returned callable waits for the copy
    and gives the array. On CUDA the copy goes to pinned memory on a side stream, so the
    compute stream goes on with the next batch while the writer thread waits for the bytes;
    on the CPU it is the tensor's own memory."""
    if t.device.type != "cuda":
        array = t.numpy()
        return lambda: array
    stream = _copy_streams.setdefault(t.device, torch.cuda.Stream(t.device))
    stream.wait_stream(torch.cuda.current_stream(t.device))
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    with torch.cuda.stream(stream):
        host.copy_(t, non_blocking=True)
    t.record_stream(stream)                   # the caching allocator must not reuse t early
    copied = torch.cuda.Event()
    copied.record(stream)

    def result() -> np.ndarray:
        copied.synchronize()
        return host.numpy()
    return result


_copy_streams: dict = {}


def autocast_for(device: torch.device, precision: str):
    """The autocast context of a precision: bf16/fp16 on CUDA; fp32, and anything on the
    CPU, runs as is (CPU autocast is slower for 3D convs and changes the results)."""
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if device.type == "cuda" and amp is not None:
        return torch.autocast("cuda", dtype=amp)
    return contextlib.nullcontext()


def _compiled(net: torch.nn.Module, digest: str) -> torch.nn.Module:
    """torch.compile for one static shape, Inductor's cache kept per model digest (a
    worker's later starts, and other workers on the machine, reuse the kernels)."""
    cache = voxflow_home() / "compile" / digest.split(":")[-1][:16]
    cache.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    return torch.compile(net, dynamic=False)


def _static_batch(program: torch.export.ExportedProgram) -> Optional[int]:
    """The batch size an exported program was specialised to, or None if it is dynamic."""
    user_inputs = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            val = node.meta.get("val")
            if val is not None and isinstance(val.shape[0], int):
                return int(val.shape[0])
            return None
    return None


def _load_python(cfg: ModelConfig, source: bytes, weights: Optional[bytes]) -> torch.nn.Module:
    """Build the module a .py file defines, from the bytes that were hashed."""
    path = Path(cfg.path)
    name = "voxflow_user_model_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    module = types.ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module                 # dataclasses and pickling look modules up
    try:
        exec(compile(source, str(path), "exec"), module.__dict__)
    except Exception as exc:                   # the file's own error, whatever it is
        sys.modules.pop(name, None)
        raise ConfigError("model.path", f"{path.name} raised on import: "
                          f"{_one_line(exc)}") from None
    if cfg.entry:
        if not hasattr(module, cfg.entry):
            raise ConfigError("model.entry", f"{path.name} defines no {cfg.entry!r}")
        factory: Callable[[], torch.nn.Module] = getattr(module, cfg.entry)
    elif hasattr(module, "build_model"):
        factory = module.build_model
    else:
        classes = [c for c in vars(module).values() if inspect.isclass(c)
                   and issubclass(c, torch.nn.Module) and c.__module__ == name
                   and not c.__name__.startswith("_")]
        if len(classes) != 1:
            raise ConfigError("model.entry", f"{path.name} defines {len(classes)} public "
                              "nn.Module classes and no build_model(); name one with "
                              "model.entry")
        factory = classes[0]
    try:
        net = factory()
    except Exception as exc:
        raise ConfigError("model.entry", f"{getattr(factory, '__name__', factory)}() of "
                          f"{path.name} raised: {_one_line(exc)}") from None
    if not isinstance(net, torch.nn.Module):
        raise ConfigError("model.entry", f"{getattr(factory, '__name__', factory)}() of "
                          f"{path.name} returned {type(net).__name__}, not a torch.nn.Module")
    if weights is not None:
        name = Path(cfg.weights).name
        try:
            if Path(cfg.weights).suffix == ".safetensors":
                from safetensors.torch import load as load_safetensors
                state = load_safetensors(weights)
            else:             # weights_only: a pickle that would run code is refused
                state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ConfigError("model.weights", f"{name} is not a readable state dict (a "
                              ".safetensors file, or a torch.save of tensors only): "
                              f"{_one_line(exc, 200)}") from None
        if not isinstance(state, dict):
            raise ConfigError("model.weights", f"{name} holds a {type(state).__name__}, not "
                              "a state dict")
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise ConfigError("model.weights", f"do not fit {path.name}: "
                              f"{' '.join(str(exc).split())[:300]}") from None
    return net


CPU_AUTO_BATCH = 4        # measured on 2-vCPU Xeon/EPYC (bench/RESULTS.md): never worse than 1


def auto_batch_size(per_patch_bytes: Optional[int], device_bytes: Optional[int],
                    share: float = 0.6, most: int = 64) -> int:
    """`batch_size: auto`: without a device (CPU) `CPU_AUTO_BATCH`; on one, the largest
    power of two of patches whose activations fit `share` of the device's memory (its
    total, not what is free now, so every worker of one GPU type picks the same batch and
    computes the same bits), at most `most`."""
    if not per_patch_bytes or not device_bytes:
        return CPU_AUTO_BATCH
    fit = int(share * device_bytes // per_patch_bytes)
    return max(1, min(most, 1 << max(fit, 1).bit_length() - 1))


class Model:
    """A loaded ConvNet on one device."""

    def __init__(self, cfg: ModelConfig, device: str | torch.device = "cpu",
                 batch_size: Optional[int | str] = None):
        """`batch_size`: the batch it will run at ("auto" or None: `resolve_batch`); a
        compiled model is specialised to it."""
        self.config = cfg
        self.device = torch.device(device)
        path = Path(cfg.path)
        data, weights = read_model_files(cfg)
        # loaded from the very bytes that were hashed: what runs is what the digest names
        self.digest = digest_model_bytes(data, weights)
        self.static_batch: Optional[int] = None
        on_cuda = self.device.type == "cuda"
        if path.suffix == ".pt2":
            try:
                program = torch.export.load(io.BytesIO(data))
            except Exception as exc:
                raise ConfigError("model.path", f"{path.name} is not a torch.export program: "
                                  f"{_one_line(exc, 200)}") from None
            self.static_batch = _static_batch(program)
            if on_cuda:
                from torch.export.passes import move_to_device_pass
                program = move_to_device_pass(program, self.device)
            self._net = program.module()
        elif path.suffix == ".py":
            self._net = _load_python(cfg, data, weights).to(self.device).eval()
        elif path.suffix in TORCHSCRIPT_SUFFIXES:
            try:
                self._net = torch.jit.load(io.BytesIO(data), map_location=self.device).eval()
            except RuntimeError as exc:
                raise ConfigError("model.path", f"{path.name} is not a TorchScript file: "
                                  f"{str(exc).splitlines()[0]}") from None
        else:
            raise ConfigError("model.path", f"unknown model format {path.suffix!r}: use .pt2, "
                              f"{', '.join(TORCHSCRIPT_SUFFIXES)} or .py")
        self.channels_last = on_cuda
        if on_cuda:
            torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
        if on_cuda and isinstance(self._net, torch.nn.Module):
            with contextlib.suppress(Exception):
                self._net = self._net.to(memory_format=torch.channels_last_3d)
        self._autocast = autocast_for(self.device, cfg.precision)
        self.compile_seconds: Optional[float] = None
        if cfg.compile and isinstance(self._net, torch.jit.ScriptModule):
            raise ConfigError("model.compile", "torch.compile needs a .py or .pt2 model, "
                              f"not TorchScript ({path.name})")
        self._eager = self._net
        self.batch_size: Optional[int] = batch_size if isinstance(batch_size, int) else None
        if cfg.compile:                      # a static batch; "auto": once resolved
            self._net = _compiled(self._net, self.digest)
            self.static_batch = self.static_batch or self.batch_size
        self._mean, self._std = cfg.normalize.mean, cfg.normalize.std

    def normalize(self, image: np.ndarray) -> torch.Tensor:
        """Image voxels (c, z, y, x) of any dtype -> float32 on the device, as the model expects.

        Integer images are moved to the device in their own dtype (less to copy), then scaled
        to [0, 1] by the dtype's maximum; then (x - mean) / std.
        """
        t = torch.from_numpy(np.ascontiguousarray(image)).to(self.device, non_blocking=True)
        t = t.float()
        if np.issubdtype(image.dtype, np.integer):
            t /= float(np.iinfo(image.dtype).max)
        if self._mean != 0.0 or self._std != 1.0:
            t = (t - self._mean) / self._std
        return t

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """(n, c, z, y, x) float32 -> (n, C, z', y', x') float32, checked (`_checked`)."""
        n = batch.shape[0]
        if self.static_batch is not None and n != self.static_batch:
            if n > self.static_batch:
                raise ValueError(f"batch of {n} exceeds the model's static batch "
                                 f"{self.static_batch}")
            pad = batch.new_zeros((self.static_batch - n, *batch.shape[1:]))
            batch = torch.cat([batch, pad])
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last_3d)
        with self._autocast:
            out = self._net(batch)
        if isinstance(out, (tuple, list)) and out:
            out = out[0]
        return self._checked(out, batch.shape[0], n)

    def _checked(self, out, sent: int, n: int) -> torch.Tensor:
        """The one check of what a model returns, every batch, wherever it runs (plan's
        `check`, warm-up, every task): a tensor of floats, (sent, output_channels, patch),
        finite. Shapes are host metadata; finiteness is one reduction on the device and one
        bool read back per batch (a forward pass is far longer). A model that breaks any of
        these raises `ModelOutputError` naming the field: its output is never blended,
        so NaN or a mis-shaped patch is never written."""
        cfg = self.config
        if not isinstance(out, torch.Tensor):
            raise ModelOutputError("model.path", f"the model returned a {type(out).__name__}, "
                                   "not a tensor")
        if not (out.dtype.is_floating_point):
            raise ModelOutputError("model.path", f"the model returned dtype "
                                   f"{str(out.dtype).removeprefix('torch.')}; voxflow blends "
                                   "floating-point outputs (probabilities)")
        if out.ndim != 5:
            raise ModelOutputError("model.path", f"the model returned {out.ndim} dimensions "
                                   f"{list(out.shape)}, expected 5 (n, c, z, y, x)")
        if out.shape[0] != sent:
            raise ModelOutputError("model.path", f"the model returned a batch of "
                                   f"{out.shape[0]} for a batch of {sent}")
        if out.shape[1] != cfg.output_channels:
            raise ModelOutputError("model.output_channels", f"the model outputs "
                                   f"{out.shape[1]} channels, the config declares "
                                   f"{cfg.output_channels}")
        spatial = list(reversed(out.shape[2:]))
        if spatial not in (list(cfg.input_patch), list(cfg.output_patch)):
            raise ModelOutputError("model.output_patch", f"the model outputs a {spatial} "
                                   f"patch for input {cfg.input_patch} (batch of {sent}); "
                                   f"expected {cfg.output_patch} or the input patch")
        out = out[:n]
        finite = torch.isfinite(out)
        if not bool(finite.all()):
            bad = int(finite.numel() - finite.sum())
            raise ModelOutputError("model.path", f"the model returned NaN or Inf ({bad} of "
                                   f"{finite.numel()} values in a batch of {n} patches)")
        return out.float()

    def resolve_batch(self, input_channels: int) -> int:
        """The batch size to run at: as given, or for "auto" `auto_batch_size` of this
        device (a probe forward of one patch on CUDA; a compiled model is then specialised
        to it)."""
        if self.batch_size is None:
            per_patch = None
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
                base = torch.cuda.memory_allocated(self.device)
                probe = torch.zeros((1, input_channels, *reversed(self.config.input_patch)),
                                    device=self.device)
                with torch.inference_mode(), self._autocast:
                    self._eager(probe)
                per_patch = torch.cuda.max_memory_allocated(self.device) - base
                total = torch.cuda.get_device_properties(self.device).total_memory
            self.batch_size = auto_batch_size(per_patch, total if per_patch else None)
            if self.config.compile and self.static_batch is None:
                self.static_batch = self.batch_size
        return self.batch_size

    def warm_up(self, input_channels: int) -> float:
        """One forward of a zero batch of the run's size, timed: a compiled model compiles
        here (the time is `compile_seconds`), cuDNN picks its kernels, and the first task is
        not slower. An eager model on the CPU has nothing to warm (its first batch costs
        what this one would): 0, and no forward."""
        self.resolve_batch(input_channels)
        if self.device.type == "cpu" and not self.config.compile:
            return 0.0
        batch = torch.zeros((self.static_batch or self.batch_size, input_channels,
                             *reversed(self.config.input_patch)), device=self.device)
        t0 = time.perf_counter()
        self(batch)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        if self.config.compile:
            self.compile_seconds = seconds
        return seconds

    def check(self, input_channels: int) -> None:
        """Run one zero patch and refuse a model whose output is not as the config declares
        (the checks every batch gets, `_checked`, as a `ConfigError` naming the field)."""
        cfg = self.config
        batch = torch.zeros((self.static_batch or 1, input_channels, *reversed(cfg.input_patch)),
                            device=self.device)
        try:
            self(batch)
        except ModelOutputError as exc:
            raise ConfigError(exc.field, exc.message) from None
        except Exception as exc:  # the model's own error, whatever it is, names no field
            raise ConfigError("model.input_patch", f"the model failed on a zero batch of "
                              f"{input_channels} channel(s) (the input layer's) x "
                              f"{cfg.input_patch}: {_model_error(exc)}") from None
