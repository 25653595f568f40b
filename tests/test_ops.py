"""The chunk operations' reference: `voxflow ops`, docs/ops.md, and the refusals of unknown
ops and bad parameters."""
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import yaml
from pydantic import BaseModel, Field

from voxflow.augment import TRANSFORMS
from voxflow.config import RunConfig
from voxflow.postprocess import OPS

REPO = Path(__file__).resolve().parents[1]


def _voxflow(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "voxflow", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def test_ops_reference_is_current():
    """docs/ops.md is generated; regenerate with `voxflow ops --markdown > docs/ops.md`."""
    from voxflow.ops import ops_markdown
    assert (REPO / "docs" / "ops.md").read_text() == ops_markdown()


def test_voxflow_ops_lists_every_operation_with_its_parameters():
    from voxflow.ops import PLACES
    res = _voxflow("ops")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for name, op in OPS.items():
        assert f"postprocess[op={name}]" in out
        for param in set(op.model_fields) - {"op"}:
            assert f"  - {param}: " in out, param
    assert f"transforms: {', '.join(TRANSFORMS)}" in out
    fields = [k for k in PLACES if k in RunConfig.model_fields]
    assert {"mask", "skip_empty", "augment", "postprocess", "segmentation"} <= set(fields)
    for key in fields:
        if key == "postprocess":
            continue
        assert f"\n{key}\n" in out, key
        ann = RunConfig.model_fields[key].annotation
        section = next((a for a in getattr(ann, "__args__", (ann,))
                        if isinstance(a, type) and issubclass(a, BaseModel)), None)
        for param in (section.model_fields if section else [""]):
            assert f"  - {key}{'.' + param if param else ''}: " in out, (key, param)
    assert "adds: segmentation-label, segmentation-pairs" in out
    assert "  - segmentation.threshold: float = 0.5" in out


def test_voxflow_ops_imports_no_torch():
    code = ("import sys; from voxflow.cli import main; main(['ops']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr


def test_an_operation_field_is_listed_once_the_config_has_it(monkeypatch):
    """An operation PLACES names but RunConfig lacks is left out, with the stages it adds;
    once RunConfig has the field, it is listed with its parameters and its stage joins the
    run order, with nothing else to edit."""
    import voxflow.ops as ops

    class Sharpen(BaseModel):
        """Unsharp masking before inference."""
        sigma: float = Field(1.0, description="Blur width, voxels.")

    class WithSharpen(RunConfig):
        sharpen: Optional[Sharpen] = Field(None, description="Sharpen the input.")

    monkeypatch.setattr(ops, "PLACES", {**ops.PLACES, "sharpen": (("sharpen",), ("inference",))})
    monkeypatch.setattr(ops, "RUN_ORDER", (("sharpen", "sharpen"), *ops.RUN_ORDER))
    assert "sharpen" not in ops.ops_text() and ops.run_order()[0][0] != "sharpen"
    monkeypatch.setattr(ops, "RunConfig", WithSharpen)
    text = ops.ops_text()
    assert "\nsharpen\n" in text and "  - sharpen.sigma: float = 1.0" in text
    assert "adds: sharpen" in text and ops.run_order()[0] == ("sharpen", "sharpen")
    assert "| `sharpen.sigma` | float | `1.0` | Blur width, voxels. |" in ops.ops_markdown()


def test_the_run_order_is_the_planners(tmp_path):
    """Every operation on: the planner's stages are the documented run order, in order."""
    from conftest import make_layer
    from voxflow.config import parse_config
    from voxflow.ops import run_order
    from voxflow.pipeline import plan
    from voxflow.stages import stage_names
    make_layer(tmp_path / "image", np.full((1, 16, 64, 64), 7, np.uint8), chunk=(32, 32, 8))
    config = parse_config({
        **BASE, "model": {**BASE["model"], "input_patch": [16, 16, 8]},
        "inference": {"chunk": [32, 32, 8], "blend": "overlap"},
        "storage_chunk": [32, 32, 8], "normalize": {}, "downsample": {"mips": 1},
        "segmentation": {"output": "seg"}}, base_dir=tmp_path)
    planned = [s.rsplit("-", 1)[0] + "-N" if s[-1].isdigit() else s
               for s in stage_names(plan(config, check_model=False))]
    assert planned == [stage for stage, _ in run_order()]


BASE = {"input": "image", "output": "out",
        "model": {"path": "m.py", "input_patch": [8, 8, 8], "output_channels": 3}}


@pytest.mark.parametrize("postprocess, field", [
    ([{"op": "threshold"}], "postprocess[0].op"),
    ([{"select": [0]}], "postprocess[0].op"),
    ([{"op": "channels", "select": [0, 7]}], "postprocess[0].select"),
    ([{"op": "channels", "select": [0], "reduce": "sum"}], "postprocess[0].reduce"),
    ([{"op": "channels", "reduce": "max"}, {"op": "channels", "select": [1]}],
     "postprocess[1].select"),
    ([{"op": "channels", "channel": 1}], "postprocess[0].channel"),
])
def test_unknown_ops_and_bad_parameters_are_refused_at_plan_naming_the_field(
        tmp_path, postprocess, field):
    """Refused while the config is read, before plan reads the input (there is none)."""
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({**BASE, "postprocess": postprocess}))
    res = _voxflow("plan", str(tmp_path / "run.yaml"))
    assert res.returncode == 2
    assert res.stderr.startswith(f"voxflow: error: {field}: "), res.stderr


def test_an_unknown_augment_transform_is_refused_naming_the_field(tmp_path):
    from voxflow.config import ConfigError, parse_config
    with pytest.raises(ConfigError) as err:
        parse_config({**BASE, "augment": ["rotate_z"]}, base_dir=tmp_path)
    assert err.value.field == "augment" and "flip_x" in err.value.message
