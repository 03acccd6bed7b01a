"""Exception and warning types raised by CortexFlow.

Every problem a user can cause (bad input, a bad checkpoint, a missing tokenizer or norm stats, an
unavailable backend) raises a subclass of :class:`CortexFlowError` whose message says what was wrong
and what was expected.
"""


class CortexFlowError(Exception):
    """Base class of every error CortexFlow raises on purpose."""


class InputError(CortexFlowError, ValueError):
    """An observation, prompt, state or noise passed to ``predict`` is malformed."""


class NonFiniteActionsError(CortexFlowError, ArithmeticError):
    """The model produced NaN or inf actions (``InferenceConfig.check_finite_actions``, and always in the server)."""


class ConfigError(CortexFlowError, ValueError):
    """An engine or model configuration is inconsistent or unsupported."""


class CheckpointError(CortexFlowError):
    """A checkpoint is missing, corrupt, truncated, of another model, or has wrong tensors."""


class TokenizerError(CortexFlowError):
    """A tokenizer is needed but missing, or cannot be loaded."""


class NormStatsError(CortexFlowError):
    """Normalisation statistics are needed but missing, or malformed."""


class BackendUnavailableError(CortexFlowError, RuntimeError):
    """The requested backend or device cannot run here (missing package, no GPU)."""


class CortexFlowWarning(UserWarning):
    """A recoverable problem CortexFlow corrected (for example a prompt that was truncated)."""
