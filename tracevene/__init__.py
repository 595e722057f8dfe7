"""tracevene: interventions on PyTorch models, recorded as programs, run on any backend."""

from .errors import (
    BackendError as BackendError,
)
from .errors import (
    ExecutionError as ExecutionError,
)
from .errors import (
    NotRunError as NotRunError,
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
from .interventions.registry import register as register
from .ir.program import Program as Program
from .model import Model as Model
from .model import load as load
from .model import wrap as wrap
from .result import Result as Result
from .tracing.tracer import trace as trace

__version__ = "0.1.0"
