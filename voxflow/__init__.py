"""voxflow: ConvNet inference over teravoxel 3D images, chunk by chunk."""
from .config import ConfigError, RunConfig, load_config, parse_config
from .geometry import Box, ChunkGrid
from .inference import SlidingWindow
from .models import Model
from .pipeline import Plan, plan
from .runner import run
from .volume import Volume

__all__ = ["Box", "ChunkGrid", "ConfigError", "Model", "Plan", "RunConfig", "SlidingWindow",
           "Volume", "load_config", "parse_config", "plan", "run"]
__version__ = "0.1.0"
