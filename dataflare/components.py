"""The component API: what a connector or operator package imports to add a ``type:``.

It needs nothing of the compiler::

    from dataflare.components import BuildContext, Strict, destination

    class EchoConfig(Strict):
        prefix: str = Field("", description="Printed before each record.")

    @destination("echo", config=EchoConfig, description="Print records.")
    def build_echo(ctx: BuildContext[EchoConfig], up): ...

A package makes its components known through the ``dataflare.components`` entry-point
group (see docs/architecture.md).
"""

from dataflare.config import Auth, Backoff, Duration, Open, Paths, Retry, Secret, Strict
from dataflare.records import Batch, Failed, RecordError
from dataflare.registry import BuildContext, Outputs, destination, source, transformation
from dataflare.retry import TransientError, call_with_retry

__all__ = [
    "Auth",
    "Backoff",
    "Batch",
    "BuildContext",
    "Duration",
    "Failed",
    "Open",
    "Outputs",
    "Paths",
    "RecordError",
    "Retry",
    "Secret",
    "Strict",
    "TransientError",
    "call_with_retry",
    "destination",
    "source",
    "transformation",
]
