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
    handlers come back at its end. The signal is also remembered (``received``) for ``check_stop``."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    received: int | None = None
    """The stop signal this process got, if any."""

    def __init__(self):
        raise_on_stop_signals.received = None
        self.previous = {sig: signal.signal(sig, self.handler) for sig in self.SIGNALS}

    @classmethod
    def handler(cls, signum, frame):
        for sig in cls.SIGNALS:  # stopping: a second signal (torchrun repeats SIGTERM) must not cut the cleanup short
            signal.signal(sig, signal.SIG_IGN)
        cls.received = signum
        raise Terminated(signum)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        raise_on_stop_signals.received = None


def check_stop() -> None:
    """Raise ``Terminated`` if a stop signal arrived and its exception was lost. A signal handler runs wherever the
    main thread is; when that is a finalizer (an object's ``__del__``, e.g. imageio's reader calling
    ``gc.collect()``, or a weakref callback), Python prints "Exception ignored in ..." and drops the exception, and
    the run would go on to the end and exit 0. The main loops call this at every step, message and request, never
    in their cleanup."""
    if raise_on_stop_signals.received is not None:
        raise Terminated(raise_on_stop_signals.received)
