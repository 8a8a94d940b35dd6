"""Errors a user can act on. Their message is one line that names the offending field or path.

The CLI prints them as `aligner <command>: error: <message>` and exits 2; the gRPC layer maps
`InvalidArgument` to INVALID_ARGUMENT and `NotFound` to NOT_FOUND.
"""


class AlignerError(Exception):
    """Base class: a problem with the user's input, configuration or environment."""


class InvalidArgument(AlignerError):
    """A malformed request or input. `field` names the offending field (e.g. `tokens.lengths`)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class NotFound(AlignerError):
    """A file, checkpoint or resource that does not exist."""


class Unavailable(AlignerError):
    """A capability or remote service that cannot be used here (e.g. TensorRT-LLM without a GPU)."""
