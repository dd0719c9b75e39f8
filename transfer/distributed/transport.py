"""Point-to-point messages between stage processes: metadata first, then the named tensors.

A message is ``(kind, meta, tensors)``. On the wire (torch.distributed send/recv):

1. a header ``int64[2]`` = (metadata byte length, number of tensors) over the gloo group, tag
   ``HEADER``, which the receiver takes from *any* source -- so independent flows (text for
   request j+1, the decode of chunk k, the control encode of chunk k+1) are served in whatever
   order they arrive;
2. the metadata as UTF-8 JSON bytes (kind, request/chunk ids, tensor names, shapes, dtypes and
   which channel each tensor takes), gloo, tag ``PAYLOAD``, from that source; the receiver
   allocates every tensor from it;
3. each tensor's bytes, from that source: CPU tensors over gloo (tag ``PAYLOAD``); CUDA tensors
   over NCCL, device to device, on a process group of their own for that *direction*
   (sender -> receiver). NCCL has no tags and no any-source receive, and one communicator per
   pair would queue a send and a receive in opposite directions on the same stream, where two
   large transfers can wait on each other; a group per direction has only one sender and one
   receiver, both in message order. (The vLLM pattern: metadata over gloo, tensors over NCCL.)

One sender thread per process sends whole messages in order; one receiver thread per process
receives whole messages into an inbox. Compute threads never block on the network, and a
sender blocked on a peer is always drained by that peer's receiver thread, which waits on
nothing else: no interleaving of flows can deadlock. JSON, never pickle: nothing received is
unpickled. Messages to the process's own rank skip the network.

``TRANSFER_TRANSPORT=pairs`` sends CPU tensors over the per-direction groups too (gloo), which
lets the CPU tests exercise the same path the CUDA tensors take.
"""

from __future__ import annotations

import json
import math
import queue
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from transfer.distributed.protocol import check_message

HEADER, PAYLOAD = 1, 2
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool)}


@dataclass
class Message:
    kind: str
    src: int
    meta: dict = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


class PeerFailure(RuntimeError):
    """Another rank failed (it sent ``abort``) or the connection to it broke."""


def direction_groups(pairs: list[tuple[int, int]], backend: str) -> dict[tuple[int, int], object]:
    """One process group per ordered pair ``(src, dst)`` of ``pairs`` (``Placement.talking_pairs``: only ranks
    that exchange tensors). Collective: every rank calls it with the same list."""
    return {(src, dst): dist.new_group([src, dst], backend=backend) for src, dst in pairs}


class Transport(ABC):
    """The interface a rank's loop talks through: ``send`` queues a protocol message for a rank and returns at once;
    ``get`` takes the next message received; ``flush`` waits until everything queued is delivered; ``abort_all`` tells
    every other rank to stop. One sender thread per process delivers whole messages in order and one receiver thread
    takes whole messages into the inbox (the module docstring says why); messages to the own rank never leave the
    process. An implementation puts a message on its wire (``deliver``) and takes the next one off (``receive``):
    ``TorchTransport`` (torch.distributed: gloo, NCCL), ``LocalTransport`` (one process, nothing to deliver)."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.inbox: queue.Queue[Message] = queue.Queue()
        self._outbox: queue.Queue = queue.Queue()
        self.bytes_sent = 0
        self.send_seconds = 0.0
        """Time the sender thread spent delivering (bytes on the wire, and waiting for the peer's receiver)."""
        self._sender = threading.Thread(target=self._send_loop, name="transport-send", daemon=True)
        self._receiver = threading.Thread(target=self._recv_loop, name="transport-recv", daemon=True)
        if world_size > 1:
            self._sender.start()
            self._receiver.start()

    @abstractmethod
    def deliver(self, dst: int, kind: str, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Put one message on the wire to ``dst`` (the sender thread; blocks until the peer takes it)."""

    @abstractmethod
    def receive(self) -> Message:
        """Take the next message off the wire, from any peer (the receiver thread; blocks)."""

    def keeps_on_device(self, tensor: torch.Tensor, dst: int) -> bool:
        """Whether ``tensor`` travels to ``dst`` from where it is (else it is copied to the CPU when queued)."""
        return False

    # -- sending -------------------------------------------------------------------------------
    def send(self, dst: int, kind: str, meta: dict | None = None, tensors: dict[str, torch.Tensor] | None = None):
        """Queue a message for ``dst``; returns at once (an event set once sent). CUDA tensors stay on the
        device when the wire carries them (``keeps_on_device``), else go through the CPU. Do not mutate them after.
        The message must be one of the protocol's (``protocol.check_message``)."""
        check_message(kind, meta or {})
        tensors = {k: (v.detach() if self.keeps_on_device(v, dst) else v.detach().cpu()).contiguous()
                   for k, v in (tensors or {}).items()}
        if dst == self.rank:
            self.inbox.put(Message(kind, self.rank, dict(meta or {}), tensors))
            return
        done = threading.Event()
        self._outbox.put((dst, kind, dict(meta or {}), tensors, done))
        return done

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued message has been received by its peer."""
        if self.world_size == 1:
            return True
        marker = threading.Event()
        self._outbox.put((None, None, None, None, marker))
        return marker.wait(timeout)

    def _send_loop(self):
        while True:
            dst, kind, meta, tensors, done = self._outbox.get()
            if dst is None:
                done.set()
                continue
            try:
                self.deliver(dst, kind, meta, tensors)
            except Exception as e:  # the peer is gone; surface it to our compute thread
                self.inbox.put(Message("abort", dst, {"error": f"lost connection to rank {dst}: {e}", "rank": dst}))
            done.set()

    # -- receiving -----------------------------------------------------------------------------
    def _recv_loop(self):
        while True:
            try:
                msg = self.receive()
            except Exception as e:  # a peer died or the group broke
                self.inbox.put(Message("abort", -1, {"error": f"lost connection to a peer: {e}", "rank": -1}))
                return
            self.inbox.put(msg)
            if msg.kind == "stop":
                return

    def get(self, timeout: float | None = None) -> Message | None:
        """Next message, or None after ``timeout`` seconds. An ``abort`` raises ``PeerFailure``."""
        try:
            msg = self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        if msg.kind == "abort":
            raise PeerFailure(msg.meta.get("error", "a peer failed"))
        return msg

    def abort_all(self, error: str, timeout: float = 5.0) -> None:
        """Best effort: tell every other rank to stop because of ``error``."""
        events = [self.send(r, "abort", {"error": error, "rank": self.rank}) for r in range(self.world_size) if r != self.rank]
        deadline = time.monotonic() + timeout
        for e in events:
            if e is not None:
                e.wait(max(0.0, deadline - time.monotonic()))


class LocalTransport(Transport):
    """One process: every message is to itself (tests, and a loop of one rank)."""

    def __init__(self, rank: int = 0):
        super().__init__(rank, 1)

    def deliver(self, dst, kind, meta, tensors) -> None:
        raise RuntimeError(f"rank {dst} does not exist in a one-process transport")

    def receive(self) -> Message:
        raise RuntimeError("a one-process transport receives nothing from a wire")


class TorchTransport(Transport):
    """Messages over torch.distributed: metadata over gloo (``group``), tensors over gloo or NCCL.

    ``pairs`` maps ``(src, dst)`` to that direction's process group (``direction_groups``); to a
    destination with one, CUDA tensors (or every tensor, ``all_via_pairs``) travel there; to any
    other, everything goes over ``group`` and CUDA tensors are staged through the CPU.
    """

    def __init__(self, rank: int, world_size: int, group=None, pairs: dict | None = None,
                 device: torch.device | None = None, all_via_pairs: bool = False):
        self.group, self.pairs = group, pairs or {}
        self.device, self.all_via_pairs = device or torch.device("cpu"), all_via_pairs
        super().__init__(rank, world_size)

    def keeps_on_device(self, t: torch.Tensor, dst: int) -> bool:
        return (self.rank, dst) in self.pairs and (t.is_cuda or self.all_via_pairs)

    def deliver(self, dst: int, kind: str, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        start = time.perf_counter()
        specs = [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."),
                  "via": "pair" if self.keeps_on_device(v, dst) else "gloo", "cuda": v.is_cuda}
                 for k, v in tensors.items()]
        payload = json.dumps({"kind": kind, "meta": meta, "tensors": specs}).encode()
        dist.send(torch.tensor([len(payload), len(tensors)], dtype=torch.int64), dst, group=self.group, tag=HEADER)
        dist.send(torch.frombuffer(bytearray(payload), dtype=torch.uint8), dst, group=self.group, tag=PAYLOAD)
        for spec, t in zip(specs, tensors.values()):
            if not t.numel():
                continue
            if spec["via"] == "pair":
                dist.send(t.reshape(-1).view(torch.uint8), dst, group=self.pairs[(self.rank, dst)])
            else:
                dist.send(t.reshape(-1).view(torch.uint8), dst, group=self.group, tag=PAYLOAD)
        self.bytes_sent += len(payload) + sum(t.numel() * t.element_size() for t in tensors.values())
        self.send_seconds += time.perf_counter() - start

    def receive(self) -> Message:
        header = torch.empty(2, dtype=torch.int64)
        src = dist.recv(header, None, group=self.group, tag=HEADER)
        raw = torch.empty(int(header[0]), dtype=torch.uint8)
        dist.recv(raw, src, group=self.group, tag=PAYLOAD)
        envelope = json.loads(bytes(raw.numpy()).decode())
        tensors = {spec["name"]: self._recv_tensor(src, spec) for spec in envelope["tensors"]}
        return Message(envelope["kind"], src, envelope["meta"], tensors)

    def _recv_tensor(self, src: int, spec: dict) -> torch.Tensor:
        dtype = _DTYPES[spec["dtype"]]
        pair = spec["via"] == "pair"
        device = self.device if pair and spec["cuda"] else torch.device("cpu")
        nbytes = math.prod(spec["shape"]) * dtype.itemsize
        buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        if nbytes:
            if pair:
                dist.recv(buf, src, group=self.pairs[(src, self.rank)])
            else:
                dist.recv(buf, src, group=self.group, tag=PAYLOAD)
        return buf.view(dtype).reshape(spec["shape"])
