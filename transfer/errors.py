"""User-facing errors: one clear line, non-zero exit, no output written; and stop signals."""

import os
import signal
import sys
import threading
import time

#: Seconds a stopped process's main thread has to unwind on its own (finish the file being written, print its line)
#: before the watchdog ends the process. Python runs a signal handler only between bytecodes: a main thread inside a
#: blocking C call (a collective waiting for a rank that already stopped, seen under torchrun: two ranks ignored
#: SIGINT until torchrun SIGKILLed them 30 s later) would not stop at all without it.
STOP_GRACE_S = 1.5
#: Called, without arguments, just before such a forced exit; each returns the names of what it removed
#: (``transfer.video_io`` removes its temp files there).
BEFORE_FORCED_EXIT: list = []


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


#: What a stopped run's line says after "stopped by SIGNAL" (the single process, and rank 0 of a torchrun run).
STOPPED_CLEANLY = "outputs already written are complete, nothing half-written is left"


def report_stop(message: str) -> None:
    """Print a stop line (once per process: the watchdog then prints none of its own)."""
    raise_on_stop_signals.reported = True
    write_line(message)


def write_line(message: str) -> None:
    """``message`` and its newline to stderr in one write: the ranks of a torchrun share one stream, and ``print``'s
    two writes (text, then newline) interleaved there (two ranks' stop lines glued on one line)."""
    sys.stderr.flush()
    try:
        os.write(sys.stderr.fileno(), (message + "\n").encode())
    except (OSError, ValueError, AttributeError):  # no real file behind stderr (a test's capture)
        print(message, file=sys.stderr, flush=True)


class raise_on_stop_signals:
    """Turn SIGTERM and SIGINT into ``Terminated`` in the main thread; as a ``with`` block, the previous
    handlers come back at its end. The signal is also remembered (``received``) for ``check_stop``."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    received: int | None = None
    """The stop signal this process got, if any."""

    reported = False
    """Whether this process has printed its stop line (``report_stop``)."""
    armed = 0
    """How many of these are in effect (a ``with`` block ends one): the watchdog acts only while one is."""

    def __init__(self):
        raise_on_stop_signals.received = None
        self.previous = {sig: signal.signal(sig, self.handler) for sig in self.SIGNALS}
        raise_on_stop_signals.armed += 1
        _start_watchdog()

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
        raise_on_stop_signals.armed -= 1


def check_stop() -> None:
    """Raise ``Terminated`` if a stop signal arrived and its exception was lost. A signal handler runs wherever the
    main thread is; when that is a finalizer (an object's ``__del__``, e.g. imageio's reader calling
    ``gc.collect()``, or a weakref callback), Python prints "Exception ignored in ..." and drops the exception, and
    the run would go on to the end and exit 0. The main loops call this at every step, message and request, never
    in their cleanup."""
    if raise_on_stop_signals.received is not None:
        raise Terminated(raise_on_stop_signals.received)


_WATCHDOG: list = []


def _start_watchdog() -> None:
    """Once per process, from the main thread: the C-level signal handler writes each signal's number to a pipe
    (``signal.set_wakeup_fd``) at once, whatever the main thread is doing; a daemon thread reading it gives the main
    thread ``STOP_GRACE_S`` to exit, then removes temp files, prints the stop line and ends the process."""
    if _WATCHDOG or threading.current_thread() is not threading.main_thread():
        return
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write)
    thread = threading.Thread(target=_watch, args=(read,), name="stop-watchdog", daemon=True)
    thread.start()
    _WATCHDOG.append(thread)


def _watch(fd: int) -> None:
    while True:
        for signum in os.read(fd, 64):
            if signum not in (signal.SIGTERM, signal.SIGINT) or not raise_on_stop_signals.armed:
                continue  # e.g. a test process that called cli.main and went on
            time.sleep(STOP_GRACE_S)
            unfinished = []
            for hook in BEFORE_FORCED_EXIT:
                try:
                    unfinished += hook() or []
                except Exception:  # a forced exit goes on whatever a hook meets
                    pass
            rank = f"rank {os.environ['RANK']} " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
            sys.stderr.flush()
            if not raise_on_stop_signals.reported:
                os.write(2, f"transfer.py: {rank}stopped by {signal.Signals(signum).name} (ended {STOP_GRACE_S} s "
                            f"after it: the work in progress did not return sooner)\n".encode())
            if unfinished:
                os.write(2, f"transfer.py: {rank}unfinished at the stop, removed: {', '.join(unfinished)}\n".encode())
            os._exit(128 + signum)
