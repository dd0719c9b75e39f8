"""User-facing errors: one clear line, non-zero exit, no output written; and stop signals."""

import signal


class TransferError(Exception):
    """A problem with the user's input, flags or checkpoint.

    The CLI prints ``str(error)`` as a single line and exits non-zero. Raise it
    before any output file is opened so bad input never leaves a partial file.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class Terminated(BaseException):
    """SIGTERM or SIGINT: unwinds the main thread (temp files of an unfinished write are removed on the way)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum  # 143 for SIGTERM, 130 for SIGINT


class raise_on_stop_signals:
    """Turn SIGTERM and SIGINT into ``Terminated`` in the main thread; as a ``with`` block, the previous
    handlers come back at its end."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.previous = {sig: signal.signal(sig, self.handler) for sig in self.SIGNALS}

    @classmethod
    def handler(cls, signum, frame):
        for sig in cls.SIGNALS:  # stopping: a second signal (torchrun repeats SIGTERM) must not cut the cleanup short
            signal.signal(sig, signal.SIG_IGN)
        raise Terminated(signum)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
