"""Errors that reach users as one clear line, and the exit codes entry points and launchers agree on."""
import math

EXIT_USER_ERROR = 2
# A run stopped by a signal (Slurm warning, preemption) after saving: the caller should requeue.
EXIT_PREEMPTED = 85
FLOAT32_MAX = 3.4028234663852886e38


class UserError(Exception):
    """A problem with the user's input, files or environment: printed as one line, exit code 2.

    Most user errors are met by every rank alike (same config, same files), so only rank 0
    prints them; an error that only some ranks can meet sets `rank_local` and is printed by
    the rank that met it.
    """

    rank_local = False


class ConfigError(UserError):
    """A bad configuration value; `key` is the dotted path, filled in as the error travels up."""

    def __init__(self, key: str, message: str, source: str | None = None):
        self.key = key
        self.message = message
        self.source = source
        super().__init__(self._line())

    def _line(self) -> str:
        where = f" (in {self.source})" if self.source else ""
        return f"config key '{self.key}': {self.message}{where}"

    def under(self, prefix: str) -> "ConfigError":
        """The same error, its key prefixed with the enclosing section's name."""
        key = f"{prefix}.{self.key}" if self.key else prefix
        return ConfigError(key, self.message, self.source)


class RankLocalError(UserError):
    """A user error that only some ranks meet (e.g. a local rank without a GPU)."""

    rank_local = True


def require_number(key: str, value: float, rule: str, ok: bool) -> None:
    """ConfigError naming `key` unless `value` is finite and `ok` (the range test) holds.

    Comparisons with NaN are all False, so `lr <= 0` alone lets `.nan` through; every float a
    component reads goes through here instead. Values beyond float32 (the training precision)
    count as infinite: torch cannot even convert them into its kernels' scalars.
    """
    if not (math.isfinite(value) and ok):
        raise ConfigError(key, f"must be a finite number {rule}, got {value}")
    if abs(value) > FLOAT32_MAX:
        raise ConfigError(key, f"must be a finite number {rule}; {value} overflows float32")
