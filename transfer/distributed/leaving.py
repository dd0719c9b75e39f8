"""How a rank leaves a torchrun run: without tearing down its process groups (receiver threads may still block in
``recv``), with its line where torchrun's agent reads a failed worker's error, and -- when every rank refuses the
same request -- only once rank 0 has printed why."""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch.distributed as dist

#: How long a rank that refused a request waits for rank 0 to have printed why, before it leaves (``refuse``).
REFUSAL_WAIT = datetime.timedelta(seconds=60)


def leave(code: int, message: str | None = None) -> None:
    """Leave without tearing down the process group: receiver threads may still block in recv. ``message``: the line
    this rank printed, also written where torchrun's agent reads a failed worker's error (``TORCHELASTIC_ERROR_FILE``),
    so that its failure summary, printed after every rank has exited, names it instead of "To enable traceback see"."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if message and error_file:
        try:
            Path(error_file).write_text(json.dumps({"message": message, "timestamp": int(time.time())}))
        except OSError:
            pass  # the summary then says what it says; the line above it is already printed
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def refuse(rank: int, world: int, message: str) -> None:
    """Every rank refused the same request before any work. Torchrun ends the other ranks with SIGTERM as soon as one
    exits, so each rank first meets the others in the store (``REFUSAL_WAIT`` at most, then leaves anyway), rank 0
    prints the line, and only then does any rank leave, each with the line in its error file (torchrun's summary)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # leaving anyway, with this line: not "stopped by SIGTERM"
    store = dist.distributed_c10d._get_default_store()
    deadline = time.monotonic() + REFUSAL_WAIT.total_seconds()
    try:
        store.add("refused", 1)
        if rank == 0:
            while store.add("refused", 0) < world and time.monotonic() < deadline:
                time.sleep(0.02)
        else:
            store.wait(["printed"], REFUSAL_WAIT)
    except Exception:  # the store gone with a rank that left: leave too
        pass
    if rank == 0:
        print(message, file=sys.stderr)
        sys.stderr.flush()
        try:
            store.set("printed", "1")
        except Exception:
            pass
    leave(2, message)
