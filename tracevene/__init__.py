"""tracevene: interventions on PyTorch models, recorded as programs, run on any backend.

The public API is ``__all__`` below, grouped as docs/api.md presents it; everything
else (``tracevene.ir``, ``tracevene.runtime``, ``tracevene.sites``, ...) is internal.
docs/architecture.md maps where each name is defined.
"""

from . import metrics, patching
from .bound import BoundProgram
from .errors import (
    ArgumentError,
    ArgumentTypeError,
    BackendError,
    DiskFullError,
    ExecutionError,
    MissingDependencyError,
    MissingFileError,
    MissingKeyError,
    NotRunError,
    PathExistsError,
    ProgramFormatError,
    RegistryError,
    ScheduleError,
    ShapeError,
    SiteError,
    TraceError,
    TraceveneError,
)
from .generation import generate
from .interventions.base import Intervention
from .interventions.registry import register
from .interventions.rotations import (
    BoundlessRotatedSpace,
    LowRankRotatedSpace,
    RotatedSpace,
    SigmoidMask,
)
from .interventions.static import Add, Interchange, MeanAblate, Noise, Scale, Zero
from .ir.program import Program
from .model import Model, load, wrap
from .result import Result
from .runtime.cache import SourceCache
from .runtime.inputs import last_token_positions
from .tracing.tracer import trace
from .training import evaluate, train

__version__ = "0.1.0"

__all__ = [
    # tracing: record a program in a with-block
    "trace",
    "last_token_positions",
    # models: wrap a PyTorch model on a backend
    "wrap",
    "load",
    "Model",
    # programs and their results
    "Program",
    "BoundProgram",
    "Result",
    "SourceCache",
    "generate",
    # interventions
    "Intervention",
    "register",
    "Zero",
    "MeanAblate",
    "Add",
    "Scale",
    "Noise",
    "Interchange",
    "RotatedSpace",
    "LowRankRotatedSpace",
    "BoundlessRotatedSpace",
    "SigmoidMask",
    # training and analysis
    "train",
    "evaluate",
    "metrics",
    "patching",
    # errors (tracevene.errors: one hierarchy under TraceveneError)
    "TraceveneError",
    "ArgumentError",
    "ArgumentTypeError",
    "BackendError",
    "DiskFullError",
    "ExecutionError",
    "MissingDependencyError",
    "MissingFileError",
    "MissingKeyError",
    "NotRunError",
    "PathExistsError",
    "ProgramFormatError",
    "RegistryError",
    "ScheduleError",
    "ShapeError",
    "SiteError",
    "TraceError",
]
