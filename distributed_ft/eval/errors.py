"""The evaluation error type: one-line problems with metrics, predictions files or eval records."""
from distributed_ft.errors import DftError


class EvalError(DftError):
    """A metric, predictions file or evaluation record is invalid."""
