"""The one exception type of the evaluation tools; the CLI turns it into ``error: ...`` and exit 2."""

from ilm_dist.errors import InputError


class EvalError(InputError):
    """Bad evaluation input (weights, label fraction, mismatched runs); the message names the file or value."""
