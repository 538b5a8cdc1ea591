"""The DSL compiler: workflow YAML -> validated model -> bytewax ``Dataflow``."""

from dataflare.dsl_compiler.compiler import StepFailed, compile_file, compile_validated
from dataflare.dsl_compiler.problems import Problem, WorkflowError
from dataflare.dsl_compiler.types import schemas
from dataflare.dsl_compiler.validate import Validated, validate_file, validate_text

__all__ = [
    "Problem",
    "StepFailed",
    "Validated",
    "WorkflowError",
    "compile_file",
    "compile_validated",
    "schemas",
    "validate_file",
    "validate_text",
]
