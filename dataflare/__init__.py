"""DataFlare: declarative data integration and stream processing on Bytewax.

    import dataflare

    result = dataflare.run("flows/quickstart.yaml", recovery_dir="state/")
    result.status, result.summary["total"]

:func:`run` is ``dataflare run`` as a function; :func:`validate_file` and
:func:`compile_file` are the compiler's stages (``compile_file`` returns the bytewax
``Dataflow``, for ``python -m bytewax.run``).
"""

from importlib.metadata import PackageNotFoundError, version

from dataflare.dsl_compiler import Problem, Validated, WorkflowError, compile_file, validate_file
from dataflare.runner import RunOptions, RunResult, run

try:
    __version__ = version("dataflare")
except PackageNotFoundError:  # pragma: no cover - a source tree that was not installed
    __version__ = "0.0.0"

__all__ = [
    "Problem",
    "RunOptions",
    "RunResult",
    "Validated",
    "WorkflowError",
    "__version__",
    "compile_file",
    "run",
    "validate_file",
]
