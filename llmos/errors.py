"""The one exception type users catch: every error that is the user's to fix is an LlmosError."""


class LlmosError(ValueError):
    """Bad input, a missing model, a refused file: the message says what was wrong and what to do."""
