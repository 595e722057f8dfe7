"""tracevene: interventions on PyTorch models, recorded as programs, run on any backend."""

from . import metrics as metrics
from . import patching as patching
from .bound import BoundProgram as BoundProgram
from .errors import (
    ArgumentError as ArgumentError,
)
from .errors import (
    ArgumentTypeError as ArgumentTypeError,
)
from .errors import (
    BackendError as BackendError,
)
from .errors import (
    DiskFullError as DiskFullError,
)
from .errors import (
    ExecutionError as ExecutionError,
)
from .errors import (
    MissingDependencyError as MissingDependencyError,
)
from .errors import (
    MissingFileError as MissingFileError,
)
from .errors import (
    MissingKeyError as MissingKeyError,
)
from .errors import (
    NotRunError as NotRunError,
)
from .errors import (
    PathExistsError as PathExistsError,
)
from .errors import (
    ProgramFormatError as ProgramFormatError,
)
from .errors import (
    RegistryError as RegistryError,
)
from .errors import (
    ScheduleError as ScheduleError,
)
from .errors import (
    ShapeError as ShapeError,
)
from .errors import (
    SiteError as SiteError,
)
from .errors import (
    TraceError as TraceError,
)
from .errors import (
    TraceveneError as TraceveneError,
)
from .generation import generate as generate
from .interventions.base import Intervention as Intervention
from .interventions.registry import register as register
from .interventions.rotations import BoundlessRotatedSpace as BoundlessRotatedSpace
from .interventions.rotations import LowRankRotatedSpace as LowRankRotatedSpace
from .interventions.rotations import RotatedSpace as RotatedSpace
from .interventions.rotations import SigmoidMask as SigmoidMask
from .interventions.static import Add as Add
from .interventions.static import Interchange as Interchange
from .interventions.static import MeanAblate as MeanAblate
from .interventions.static import Noise as Noise
from .interventions.static import Scale as Scale
from .interventions.static import Zero as Zero
from .ir.program import Program as Program
from .model import Model as Model
from .model import load as load
from .model import wrap as wrap
from .result import Result as Result
from .runtime.cache import SourceCache as SourceCache
from .runtime.inputs import last_token_positions as last_token_positions
from .tracing.tracer import trace as trace
from .training import evaluate as evaluate
from .training import train as train

__version__ = "0.1.0"
