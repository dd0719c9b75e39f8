"""The output gate: a request's files appear under their final names only after its checks pass.

Modes (``--guardrail``):

- ``on``: the text check runs before the request is generated (a blocked prompt is never
  generated); the video check runs when its frames are ready, then the files are written.
- ``async``: text checks run in a background thread from the start of the run, beside the text
  encoder and the DiT; the video check and the write of request j run in another background
  thread while request j+1 generates. A request whose text check has already failed when its
  turn comes is not generated; one that fails later is generated and discarded. The files are the
  same as with ``on`` (same guards, same frames), only the timing differs.
- ``off``: write at once.

Either way a blocked request writes ``{name}.blocked.json`` (stage, guard, reason) and no video,
and every other request keeps its own name. Guards fail closed (``GuardSet``); an error while
*writing* is not a guard verdict and fails the run.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from loguru import logger

from guardrails import Blocked, GuardSet


class Gate:
    def __init__(self, guards: GuardSet | None, mode: str, write, write_blocked, notify=None):
        """``write(request, result) -> Path`` writes the outputs, ``write_blocked(request, Blocked) -> Path`` the
        record; ``notify()`` is called from the worker thread after each asynchronous release."""
        self.guards = guards if mode != "off" else None
        self.mode = mode if self.guards is not None else "off"
        self._write, self._write_blocked, self._notify = write, write_blocked, notify
        self.written: list[Path] = []
        self.blocked: dict[str, Blocked] = {}
        self._text: dict[int, Blocked | None | Future] = {}
        self._lock = threading.Lock()
        self._pending = 0
        self._errors: list[BaseException] = []
        if self.mode == "async":
            self._text_pool = ThreadPoolExecutor(1, thread_name_prefix="guard-text")
            self._release_pool = ThreadPoolExecutor(1, thread_name_prefix="guard-release")

    @property
    def pending(self) -> int:
        """Releases handed to the background thread and not finished (0 unless async)."""
        with self._lock:
            return self._pending

    def start(self, requests) -> None:
        """async: start the text check of every ``(j, request)`` now, in the background, so each verdict is usually
        in before the request's turn comes. on / off: nothing (``admit`` checks each request when its turn comes)."""
        if self.mode == "async":
            for j, request in requests:
                self._text[j] = self._text_pool.submit(self.guards.check_text, self._prompts(request))

    def admit(self, j: int, request) -> None:
        """on: run request ``j``'s text check now, before it is generated (async: already started)."""
        if self.mode == "on" and j not in self._text:
            self._text[j] = self.guards.check_text(self._prompts(request))

    @staticmethod
    def _prompts(request) -> dict[str, str]:
        return {"prompt": request.prompt, "negative_prompt": request.negative_prompt}

    def skip_generation(self, j: int) -> bool:
        """True when request ``j`` is already known to be blocked by its text check."""
        verdict = self._text.get(j)
        if isinstance(verdict, Future):
            verdict = verdict.result() if verdict.done() else None
        return verdict is not None

    def release(self, j: int, request, result) -> None:
        """Check request ``j``'s frames and write its outputs, or its record (``result`` None: not generated)."""
        if self.mode != "async":
            self._release(j, request, result)
            return
        with self._lock:
            self._pending += 1
        self._release_pool.submit(self._release_in_thread, j, request, result)

    def _release_in_thread(self, j, request, result) -> None:
        try:
            self._release(j, request, result)
        except BaseException as e:  # re-raised in the main thread by check()
            self._errors.append(e)
        finally:
            with self._lock:
                self._pending -= 1
            if self._notify is not None:
                self._notify()

    def _release(self, j: int, request, result) -> None:
        verdict = self._text.pop(j, None)
        blocked = verdict.result() if isinstance(verdict, Future) else verdict
        frames = None
        if blocked is None and self.guards is not None:
            frames, blocked = self.guards.check_video(result.frames)
        if blocked is not None:
            self.blocked[request.name] = blocked
            self._write_blocked(request, blocked)
            logger.warning(f"{request.name}: blocked by the {blocked.guard} guard ({blocked.stage}): {blocked.reason}")
            return
        if frames is not None and frames is not result.frames:
            logger.info(f"{request.name}: a video guard altered the frames (faces pixelated); latents are not saved")
            result = type(result)(frames, None)
        self.written.append(self._write(request, result))
        logger.info(f"wrote {self.written[-1]}")

    def check(self) -> None:
        """Raise the first error a background release met (a failed write)."""
        if self._errors:
            raise self._errors[0]

    def abort(self) -> None:
        """Stop: drop the releases not yet started, wait for the one being written (atomic either way)."""
        if self.mode == "async":
            self._text_pool.shutdown(wait=False, cancel_futures=True)
            self._release_pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> str:
        """Wait for every release; raise a background error; return (and log) the summary."""
        if self.mode == "async":
            self._text_pool.shutdown(wait=True)
            self._release_pool.shutdown(wait=True)
        self.check()
        if self.mode == "off":
            return f"{len(self.written)} written (guardrails off)"
        lines = [f"guardrails ({self.mode}): {len(self.written)} written, {len(self.blocked)} blocked"]
        lines += [f"  {name}: {b.stage} / {b.guard}: {b.reason}" for name, b in sorted(self.blocked.items())]
        if self.blocked and not self.written:
            lines.append("  every request was blocked: no video written (records: <name>.blocked.json)")
        summary = "\n".join(lines)
        (logger.warning if self.blocked else logger.info)(summary)
        return summary
