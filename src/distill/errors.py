"""The one exception type that `distill` raises for problems a user can fix.

Every message is a single actionable sentence: the CLI prints it as `error: <message>` and exits non-zero, the
service returns it in the job's failure reason. Bugs stay ordinary Python exceptions with tracebacks.
"""

from __future__ import annotations


class DistillError(Exception):
    """A problem with the user's input, configuration, files or environment, explained in one line."""


class DataError(DistillError):
    """A data file or array does not have the expected columns, shapes, types or label range."""


class CacheError(DistillError):
    """A teacher-output cache is missing, corrupt, or was built for another teacher or data set."""


class ShapeMismatchError(DistillError):
    """Teacher and student disagree on the number of classes or the vocabulary."""


class NonFiniteLossError(DistillError):
    """A training loss became NaN or infinite."""
