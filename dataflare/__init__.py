"""DataFlare: declarative data integration and stream processing on Bytewax.

    import dataflare

    result = dataflare.run("flows/quickstart.yaml", recovery_dir="state/")
    result.status, result.summary["total"]

:func:`run` is ``dataflare run`` as a function; :func:`validate_file` and
:func:`compile_file` are the compiler's stages (``compile_file`` returns the bytewax
``Dataflow``, for ``python -m bytewax.run``). Components import
:mod:`dataflare.components`, which needs none of these (they load on first use).
"""

import os
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

# Arrow's default allocator (mimalloc) keeps the memory a Parquet output frees: a Parquet
# destination peaked at 2.7x the memory of JSON lines with it, 2x with the system's
# (bench/lake.py). Set before pyarrow loads; a value the user set wins.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

try:
    __version__ = version("dataflare")
except PackageNotFoundError:  # pragma: no cover - a source tree that was not installed
    __version__ = "0.0.0"

_EXPORTS = {
    "Problem": "dataflare.dsl_compiler",
    "Validated": "dataflare.dsl_compiler",
    "WorkflowError": "dataflare.dsl_compiler",
    "compile_file": "dataflare.dsl_compiler",
    "validate_file": "dataflare.dsl_compiler",
    "RunOptions": "dataflare.runner",
    "RunResult": "dataflare.runner",
    "run": "dataflare.runner",
}

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

if TYPE_CHECKING:
    from dataflare.dsl_compiler import (
        Problem,
        Validated,
        WorkflowError,
        compile_file,
        validate_file,
    )
    from dataflare.runner import RunOptions, RunResult, run


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    msg = f"module 'dataflare' has no attribute {name!r}"
    raise AttributeError(msg)
