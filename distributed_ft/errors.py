"""Error types the CLI turns into one-line messages and a non-zero exit."""


class DftError(Exception):
    """A problem with the user's input or environment, reported as one line (no traceback)."""


class ConfigError(DftError):
    """A config file, field or override is invalid."""


class DataError(DftError):
    """A dataset cannot be read or does not have what the config asks for."""


class ModelError(DftError):
    """A model or tokenizer cannot be loaded."""


class EvalError(DftError):
    """A metric, predictions file or evaluation record is invalid."""
