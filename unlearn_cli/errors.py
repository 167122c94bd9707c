"""The errors a user can fix.

Every `UnlearnError` is caught at the command boundary (`cli.py`) and printed as one red line, exit
code 1. Its message says what is wrong, what was expected and how to fix it. Anything else is a bug
in `unlearn` and keeps its traceback. Set `UNLEARN_TRACEBACK=1` to see tracebacks for these too.
"""


class UnlearnError(Exception):
    """A problem the user can fix; the message is shown as is."""


class ConfigError(UnlearnError):
    """A config file or `--set` override is wrong."""


class StoreError(UnlearnError):
    """The checkpoint store is missing, incomplete, incompatible or damaged."""


class DataError(UnlearnError):
    """A dataset cannot be found or read."""


class MethodError(UnlearnError):
    """An unlearning method is unknown or cannot be loaded."""


class JobsFailed(UnlearnError):
    """Some launched jobs failed; the others finished and were stored."""


class OutputsError(StoreError):
    """A model's per-sample outputs do not fit the experiment (shape, class count, NaN)."""
