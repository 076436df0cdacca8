"""Exceptions whose message is the one line a user sees: what failed, where, and the fix."""


class LCAError(Exception):
    """Base class: the CLI prints ``str(err)`` alone and exits with status 1."""


class TrajectoryError(LCAError, ValueError):
    """A trajectory store is missing, malformed, corrupted or inconsistent."""


class RecorderError(LCAError, RuntimeError):
    """Recording cannot go on (shape/dtype change, bad destination, writer failure)."""


class TaskError(LCAError, ValueError):
    """A task reference cannot be imported or does not match the recorded model."""


class ConfigError(LCAError, ValueError):
    """A configuration key or value is unknown or has the wrong type."""


class GroupingError(LCAError, ValueError):
    """A grouping does not partition the recorded parameters."""


class CubeError(LCAError, ValueError):
    """A cube is missing, malformed, or was made with other settings."""


class ReplayError(LCAError, RuntimeError):
    """A replay cannot be carried out (non-finite values, empty data, bad step range)."""


class CubeBusyError(CubeError):
    """Steps of a cube are being replayed by another process right now (see replay/cube/lock.py)."""
