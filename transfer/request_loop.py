"""The request loop, once for both execution paths: the single process (``transfer.runner``) and the stage processes'
coordinator (``transfer.distributed.coordinator``) take their requests in this order and under these rules.

1. Requests complete in the output folder's ``manifest.json`` are skipped (``Job.to_do``).
2. Every request's inputs are checked (decoded, sized) before any output is written; a batch request that fails its
   check is recorded (``failures.jsonl``) and skipped; the output folder is held from the first request ready on.
3. Then, in request order, each is admitted by the output gate (``on``: its text check); one the gate blocks is
   released as its record without generating; the rest go to generation with their checked inputs, checked again
   when they were not kept (a batch keeps memory flat).

What happens to a request that fails while generating is ``Job.fail`` (the failure rule, also once).
"""

from __future__ import annotations

import contextlib
from collections import deque


class RequestLoop:
    def __init__(self, job, gate, span=None):
        """``gate``: the run's output gate (``transfer.outputs.make_gate``); ``span(name, request=j)``: a context
        manager timing each step (the coordinator's tracer), none by default."""
        self.job, self.gate = job, gate
        self.span = span or (lambda name, **_: contextlib.nullcontext())
        self.todo = [(j, job.requests[j]) for j in job.to_do()]
        """``(index, request)`` of every request still to make."""
        self.checked: list[int] = []
        """Requests whose inputs passed their check."""
        self.waiting: deque[int] = deque()
        """Requests checked and not yet handed out, in order."""
        self.kept: dict[int, object] = {}
        """Checked inputs (``PreparedRequest``) kept for waiting requests; ``drop_kept`` lets them go."""

    def check(self, wait=None):
        """Check every request's inputs in order, yielding the index of each that is ready. ``wait(j, request)``
        (optional) runs first and says whether the request can still run (e.g. its controls computed elsewhere).
        The gate's text checks start first (``async``: all of them, in the background)."""
        self.gate.start(self.todo)
        for j, request in self.todo:
            if wait is not None and not wait(j, request):
                continue
            with self.span("prepare", request=j):
                prepared = self.job.prepare(request)
            if prepared is None:
                continue
            self.job.manifest.hold_folder()  # from the first request ready on, this run owns the folder
            self.checked.append(j)
            self.waiting.append(j)
            self.kept[j] = prepared
            yield j

    def modalities(self) -> list[str]:
        """The controls of the checked requests: the ControlNets a run loads."""
        return sorted({m for j in self.checked for m in self.job.requests[j].controls})

    def drop_kept(self) -> None:
        """Let the checked inputs of waiting requests go: they are checked again when their turn comes."""
        self.kept.clear()

    def next(self):
        """The next request to generate, ``(j, prepared)``, or None when none waits. Blocked requests on the way
        are released as their records."""
        while self.waiting:
            j = self.waiting.popleft()
            request = self.job.requests[j]
            with self.span("text guard", request=j):
                self.gate.admit(j, request)  # on: checked before it is generated
            if self.gate.skip_generation(j):
                self.kept.pop(j, None)
                self.gate.release(j, request, None)  # its record
                continue
            prepared = self.kept.pop(j, None)
            if prepared is None:
                with self.span("prepare", request=j):
                    prepared = self.job.prepare(request)
                if prepared is None:
                    continue
            return j, prepared
        return None


def generate_requests(job, gate, load) -> None:
    """Every request of ``job`` through the request loop, generated in order by the pipeline ``load(modalities)``
    returns on first need (``generate(prepared)``), released through ``gate``, which is closed at the end (aborted on a
    stop). A request that fails follows the failure rule (``Job.fail``), unless the pipeline says it ``ends_run``
    (ranks in lockstep cannot skip one request)."""
    from transfer.errors import Terminated, check_stop

    requests = RequestLoop(job, gate)
    # Decode and check every input before loading models; a batch request that fails is recorded and skipped.
    if len(list(requests.check())) > 1:
        requests.drop_kept()  # batch: keep memory flat, decode again when its turn comes
    try:
        pipeline = None
        while True:
            check_stop()
            turn = requests.next()
            if turn is None:
                break
            j, ready = turn
            pipeline = pipeline or load(requests.modalities())
            try:
                result = pipeline.generate(ready)
            except Exception as e:  # the failure rule: a batch goes on without it; a single request fails the run
                if getattr(pipeline, "ends_run", False):
                    raise
                job.fail(ready.request, e)
                continue
            gate.check()
            gate.release(j, ready.request, result)  # async: checked and written while the next request generates
        gate.close()
        check_stop()  # a stop whose exception a finalizer swallowed still ends the run as stopped
    except Terminated:
        gate.abort()  # the output being written finishes under its final name; nothing else starts
        raise
