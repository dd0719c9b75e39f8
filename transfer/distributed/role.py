"""A role's place on a rank: its own state and the handlers of the messages it receives.

Each role (``coordinator``, ``preprocess``, ``text``, ``vae``, ``dit``) is a ``Role`` subclass with an ``on_<kind>``
method for every message kind whose receiver it is (``protocol.KINDS``). A rank's ``RankLoop`` makes one object per
role the placement gives it and dispatches each message to the role that receives its kind; the loop itself owns what
every role shares: the transport, the tracer, the job, the per-request failure rule and shutdown.
"""

from __future__ import annotations


class Role:
    name = ""
    """The role's name in ``protocol.KINDS`` (a kind's receiver) and ``Placement.stages_of``."""

    def __init__(self, loop):
        self.loop = loop

    @property
    def rank(self) -> int:
        return self.loop.rank

    @property
    def job(self):
        return self.loop.job

    @property
    def placement(self):
        return self.loop.placement

    @property
    def transport(self):
        return self.loop.transport

    @property
    def tracer(self):
        return self.loop.tracer

    def forget(self, j: int) -> None:
        """Drop every piece of state this role holds for request ``j`` (a stage failed on it)."""

    @property
    def has_idle_work(self) -> bool:
        """Whether work that waits for no message is queued (the loop then polls for messages without waiting)."""
        return False

    def idle_work(self) -> bool:
        """Do one piece of work that waits for no message (the VAE's control encodes); False when there is none."""
        return False

    def after_message(self) -> None:
        """Work a message may have made ready (the DiT's chunks whose inputs are all there)."""
