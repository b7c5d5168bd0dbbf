"""Errors a user can cause. Each carries one line naming the key or path, the problem and the fix."""


class UserError(Exception):
    """Bad input: printed by the CLI as one line, exit status 2, before any compute is spent."""


class RecipeError(UserError, ValueError):
    """A recipe key is missing, unknown, mistyped or out of range."""


class DataError(UserError):
    """A data folder, file or archive is missing, empty or unreadable."""


class NonFiniteLossError(UserError):
    """The training loss became NaN/Inf: the run stops, the last good checkpoint stays."""


class NonFiniteGradientError(UserError):
    """A gradient became NaN/Inf (loss finite): the run stops, the last good checkpoint stays."""
