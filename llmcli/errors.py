"""The one exception type that the CLI turns into a one-line message and a non-zero exit."""


class LlmcliError(Exception):
    """A problem with the user's input or files, explained in one line.

    `exit_code` follows the shell convention: 1 for a failed operation, 2 for bad usage.
    """

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
