"""Entry point: ``python transfer.py ...`` or ``torchrun --nproc_per_node N transfer.py --num_gpus N ...``."""

import os
import sys

from transfer.errors import Terminated, raise_on_stop_signals, report_stop

if __name__ == "__main__":
    raise_on_stop_signals()  # before the imports below: Ctrl-C at any moment ends with one line, not a traceback
    try:
        from transfer.cli import main
    except Terminated as stop:
        report_stop(f"transfer.py: stopped by {stop}")
        os._exit(stop.exit_code)
    code = main()
    if code in (130, 143):  # stopped: every file is finished or removed; skip the interpreter's teardown (seconds)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
