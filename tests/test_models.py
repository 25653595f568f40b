"""The three model formats give the same predictions; static batches are padded."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from voxflow.config import ConfigError, ModelConfig
from voxflow.inference import SlidingWindow
from voxflow.models import Model

from conftest import SmallConv

MODULE_SOURCE = '''
import torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv3d(1, 4, 3, padding=1)
        self.b = torch.nn.Conv3d(4, 2, 3, padding=1)

    def forward(self, x):
        return torch.sigmoid(self.b(torch.relu(self.a(x))))
'''

PATCH = [12, 10, 6]


def _cfg(path, **kw):
    return ModelConfig(path=str(path), input_patch=PATCH, output_channels=2, **kw)


def _predict(cfg, image, batch_size=4):
    return SlidingWindow(Model(cfg), PATCH, PATCH, [3, 3, 2], batch_size)(image).numpy()


@pytest.fixture
def image():
    return (np.random.default_rng(2).random((1, 13, 20, 29)) * 255).astype(np.uint8)


@pytest.fixture
def reference(tmp_path, image):
    path = tmp_path / "ref.pt"
    torch.jit.script(SmallConv().eval()).save(str(path))
    return _predict(_cfg(path), image)


def test_exported_program_with_static_batch_pads_last_batch(tmp_path, image, reference):
    example = torch.zeros(4, 1, *reversed(PATCH))
    program = torch.export.export(SmallConv().eval(), (example,))
    torch.export.save(program, str(tmp_path / "m.pt2"))
    model = Model(_cfg(tmp_path / "m.pt2"))
    assert model.static_batch == 4
    n_patches = len(SlidingWindow(model, PATCH, PATCH, [3, 3, 2], 4).patches(image.shape[1:]))
    assert n_patches % 4                      # the last batch really is short
    assert np.abs(_predict(_cfg(tmp_path / "m.pt2"), image) - reference).max() < 1e-6


def test_exported_program_with_dynamic_batch(tmp_path, image, reference):
    example = torch.zeros(2, 1, *reversed(PATCH))
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(SmallConv().eval(), (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(tmp_path / "m.pt2"))
    assert Model(_cfg(tmp_path / "m.pt2")).static_batch is None
    assert np.abs(_predict(_cfg(tmp_path / "m.pt2"), image, 3) - reference).max() < 1e-6


@pytest.mark.parametrize("weights", ["w.safetensors", "w.pth"])
def test_python_module_plus_weights(tmp_path, image, reference, weights):
    (tmp_path / "net.py").write_text(MODULE_SOURCE)
    state = SmallConv().state_dict()
    if weights.endswith(".safetensors"):
        save_file(state, str(tmp_path / weights))
    else:
        torch.save(state, tmp_path / weights)
    cfg = _cfg(tmp_path / "net.py", weights=str(tmp_path / weights))
    assert np.abs(_predict(cfg, image) - reference).max() < 1e-6
    cfg = _cfg(tmp_path / "net.py", weights=str(tmp_path / weights), entry="Net")
    assert np.abs(_predict(cfg, image) - reference).max() < 1e-6


def test_weights_that_do_not_fit_are_refused(tmp_path):
    (tmp_path / "net.py").write_text(MODULE_SOURCE)
    save_file({"a.weight": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ConfigError, match="^model.weights: do not fit"):
        Model(_cfg(tmp_path / "net.py", weights=str(tmp_path / "w.safetensors")))


def test_unknown_format_and_missing_entry(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"x")
    with pytest.raises(ConfigError, match="^model.path: unknown model format"):
        Model(_cfg(tmp_path / "m.onnx"))
    (tmp_path / "net.py").write_text(MODULE_SOURCE)
    with pytest.raises(ConfigError, match="^model.entry"):
        Model(_cfg(tmp_path / "net.py", entry="Missing"))


def test_normalisation_mean_std(tmp_path, image):
    path = tmp_path / "m.pt"
    torch.jit.script(SmallConv().eval()).save(str(path))
    got = _predict(_cfg(path, normalize={"mean": 0.5, "std": 0.25}), image)
    scaled = ((image.astype(np.float32) / 255.0) - 0.5) / 0.25
    want = _predict(_cfg(path), scaled.astype(np.float32))   # float input: no scaling
    assert np.abs(got - want).max() < 1e-6
    assert np.abs(got - _predict(_cfg(path), image)).max() > 1e-3


def test_a_compiled_model_predicts_as_the_eager_one_and_caches_its_kernels(
        tmp_path, image, voxflow_home):
    """model.compile: torch.compile for the run's batch (shorter batches padded: one
    shape, no recompile), the kernels cached per model digest, the first forward's time
    reported as compile_seconds."""
    (tmp_path / "net.py").write_text("from conftest import SmallConv\n\n\n"
                                     "def build_model():\n    return SmallConv()\n")
    cfg = _cfg(tmp_path / "net.py", compile=True)
    eager = SlidingWindow(Model(_cfg(tmp_path / "net.py")), PATCH, PATCH, [3, 3, 2], 4)(image)
    model = Model(cfg, batch_size=4)
    assert model.static_batch == 4 and model.compile_seconds is None
    assert model.warm_up(1) > 0 and model.compile_seconds > 0
    window = SlidingWindow(model, PATCH, PATCH, [3, 3, 2], 4)
    assert len(window.patches(image.shape[1:])) % 4          # a short last batch
    got = window(image)
    assert torch.allclose(got, eager, atol=1e-5)
    cache = voxflow_home / "compile" / model.digest.split(":")[-1][:16]
    assert any(cache.rglob("*")), "no compiled kernels were cached"


def test_torchscript_cannot_be_compiled(tmp_path):
    torch.jit.script(SmallConv().eval()).save(str(tmp_path / "m.pt"))
    with pytest.raises(ConfigError, match="model.compile"):
        Model(_cfg(tmp_path / "m.pt", compile=True))


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_autocast_runs_only_on_cuda_in_the_precision_asked():
    from voxflow.models import autocast_for
    cuda = torch.device("cuda")
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        ctx = autocast_for(cuda, precision)
        assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == dtype
        assert ctx.device == "cuda"
    assert not isinstance(autocast_for(cuda, "fp32"), torch.autocast)
    assert not isinstance(autocast_for(torch.device("cpu"), "bf16"), torch.autocast)


def test_channels_last_batches_predict_the_same(tmp_path, image, reference):
    """The CUDA layout (channels_last_3d batches), forced on the CPU: same predictions."""
    path = tmp_path / "m.pt"
    torch.jit.script(SmallConv().eval()).save(str(path))
    model = Model(_cfg(path))
    assert not model.channels_last                          # CPU: contiguous
    model.channels_last = True
    got = SlidingWindow(model, PATCH, PATCH, [3, 3, 2], 4)(image).numpy()
    assert np.abs(got - reference).max() < 1e-6


def test_auto_batch_size_fits_the_device_and_is_4_on_the_cpu(tmp_path, image, reference):
    from voxflow.models import CPU_AUTO_BATCH, auto_batch_size
    gib = 2**30
    assert auto_batch_size(None, None) == CPU_AUTO_BATCH == 4
    assert auto_batch_size(3 * gib, 80 * gib) == 16       # 0.6 * 80 / 3 = 16.0
    assert auto_batch_size(3 * gib, 79 * gib) == 8        # 15.8: the power of two below
    assert auto_batch_size(10 * gib, 12 * gib) == 1       # less than one: still one
    assert auto_batch_size(2**20, 80 * gib) == 64         # capped
    path = tmp_path / "m.pt"
    torch.jit.script(SmallConv().eval()).save(str(path))
    model = Model(_cfg(path), batch_size="auto")
    assert model.batch_size is None and model.resolve_batch(1) == 4
    got = SlidingWindow(Model(_cfg(path), batch_size="auto"), PATCH, PATCH, [3, 3, 2],
                        "auto")(image).numpy()
    assert np.abs(got - reference).max() < 1e-6
