"""tracevene: interventions on PyTorch models, recorded as programs, run on any backend."""

from .errors import (
    BackendError as BackendError,
    ExecutionError as ExecutionError,
    NotRunError as NotRunError,
    ProgramFormatError as ProgramFormatError,
    RegistryError as RegistryError,
    ScheduleError as ScheduleError,
    ShapeError as ShapeError,
    SiteError as SiteError,
    TraceError as TraceError,
    TraceveneError as TraceveneError,
)
from .interventions.registry import register as register
from .ir.program import Program as Program
from .model import Model as Model, load as load, wrap as wrap
from .result import Result as Result
from .tracing.tracer import trace as trace

__version__ = "0.1.0"
