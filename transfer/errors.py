"""User-facing errors: one clear line, non-zero exit, no output written."""


class TransferError(Exception):
    """A problem with the user's input, flags or checkpoint.

    The CLI prints ``str(error)`` as a single line and exits non-zero. Raise it
    before any output file is opened so bad input never leaves a partial file.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
