"""The stage protocol: every message kind the stage processes exchange, who sends it, who receives it, its meta
fields, its tensors and whether it belongs to one request.

Roles (``Placement`` says which rank holds each; one rank may hold several): ``coordinator`` (plans, prepares inputs,
guards and writes outputs), ``preprocess`` (computes controls; the coordinator unless placed elsewhere), ``text``
(the text encoder), ``vae`` (control encodes, decodes, re-encodes), ``dit`` (a DiT group: its leader talks to the
other stages, every rank of it denoises), ``any`` (every rank).

One request's messages, in order (chunk k of K; ``roundtrip`` conditioning shown)::

    coordinator --text--------------> text --embeds-----------> dit leader
    coordinator --chunk_plan--------> dit leader
    coordinator --controls----------> vae --control_latents(k)-> dit leader
    dit leader  --shard_chunk(k)----> the group's other ranks   (they exchange velocity per step with cfg 2)
    dit leader  --decode(k)---------> vae --decoded(k)---------> coordinator   (writes after the last chunk)
                                      vae --cond(k+1)----------> dit leader    (roundtrip: the re-encoded overlap)

A handler error on a ``request_work`` kind fails that request only, in a batch (the receiver reports ``failed`` to the
coordinator, which records it and sends ``drop`` to every rank); on any other kind it ends the run (``abort``).
``Transport.send`` checks each message against this table: an unknown kind or other meta fields are a bug, raised at
the sender, not a hang at the receiver.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    name: str
    sender: str
    receiver: str
    meta: frozenset[str]
    """Exactly these meta fields (JSON values)."""
    tensors: str = ""
    """The tensors it carries (names; ``.{m}``: one per control modality)."""
    request_work: bool = False
    """Its handler does one request's work: an error there fails that request only, in a batch."""
    dispatched: bool = True
    """Handled by the receiver's ``on_<kind>`` (False: a reply its sender awaits, or the transport's own)."""
    always: bool = False
    """Handled even for a request this rank dropped: its sender is already inside collectives that need this rank."""
    about: str = ""
    """What it carries, for the reader of this table (no code reads it)."""


def _kind(name: str, sender: str, receiver: str, meta: str, tensors: str = "", request_work: bool = False,
          dispatched: bool = True, about: str = "", always: bool = False) -> Kind:
    return Kind(name, sender, receiver, frozenset(meta.split()), tensors, request_work, dispatched, always, about)


KINDS = (
    _kind("precompute", "coordinator", "preprocess", "j", request_work=True,
          about="compute request j's missing controls (written to the lossless cache)"),
    _kind("precomputed", "preprocess", "coordinator", "j", dispatched=False,
          about="request j's controls are on disk (awaited by the coordinator)"),
    _kind("text", "coordinator", "text", "j leader prompt negative", request_work=True,
          about="encode request j's prompt (and negative prompt with CFG) for the DiT leader"),
    _kind("embeds", "text", "dit", "j", "prompt [negative]", request_work=True, about="request j's text embeddings"),
    _kind("chunk_plan", "coordinator", "dit", "j seed num_frames height width scales", "[weights.{m}]",
          request_work=True, about="request j's chunk schedule (frames, size), seed and control scales (spatial weight "
          "maps per chunk)"),
    _kind("controls", "coordinator", "vae", "j leader num_frames height width", "{m}: uint8 control frames",
          request_work=True,
          about="request j's control videos; the VAE encodes them chunk by chunk for the leader"),
    _kind("control_latents", "vae", "dit", "j k", "{m}", request_work=True, about="chunk k's control latents"),
    _kind("cond", "vae", "dit", "j k", "cond", request_work=True,
          about="roundtrip: chunk k's condition latents (chunk k-1 decoded, its overlap re-encoded)"),
    _kind("shard_chunk", "dit", "dit", "j k num_cond pixel scales",
          "noise prompt [negative] [cond] control.{m} [weights.{m}]", request_work=True,
          about="the leader's chunk inputs for the other ranks of its group, which denoise in lockstep"),
    _kind("velocity", "dit", "dit", "j k i", "velocity",
          about="cfg 2: this branch's velocity at step i, for the counterpart in the other branch"),
    _kind("decode", "dit", "vae", "j k reencode", "latents", request_work=True,
          about="chunk k's denoised latents (reencode: chunk k+1 waits for its condition from them)"),
    _kind("vae_work", "vae", "vae", "j k op reencode", "[latents] [{m}: uint8 control frames of the window]",
          request_work=True, always=True,
          about="a VAE group's leader to its other ranks, before it enters the call: make this call on your band "
          "(op: encode_controls with the window's frames, or decode with the latents, and with reencode the condition)"),
    _kind("decoded", "vae", "coordinator", "j k", "frames latents", about="chunk k's frames (uint8) and latents"),
    _kind("released", "coordinator", "coordinator", "",
          about="the output gate finished a request (guards beside generation wake the loop)"),
    _kind("failed", "any", "coordinator", "j error", about="a stage failed on request j (batch: recorded, the rest runs)"),
    _kind("drop", "coordinator", "any", "j", about="forget request j: a stage failed on it"),
    _kind("stop", "coordinator", "any", "", about="every request is written: report and leave"),
    _kind("trace", "any", "coordinator", "rank spans guards bytes_sent send_seconds params memory", dispatched=False,
          about="this rank's trace spans, traffic, parameters and memory, at the end (awaited by the coordinator)"),
    _kind("abort", "any", "any", "error rank", dispatched=False,
          about="a rank failed: every rank ends the run (the transport raises PeerFailure)"),
)
PROTOCOL = {k.name: k for k in KINDS}


def survives_drop(kind: str) -> bool:
    """Whether a message of ``kind`` is handled even for a request its receiver dropped (``Kind.always``)."""
    spec = PROTOCOL.get(kind)
    return spec is not None and spec.always


class ProtocolError(RuntimeError):
    """A message the protocol does not have (a bug in the sender)."""


def check_message(kind: str, meta: dict) -> Kind:
    """The ``Kind`` of a message about to be sent; raises ``ProtocolError`` for an unknown kind or other meta fields."""
    spec = PROTOCOL.get(kind)
    if spec is None:
        raise ProtocolError(f"unknown message kind {kind!r} (transfer.distributed.protocol.KINDS)")
    if set(meta) != spec.meta:
        missing, extra = sorted(spec.meta - set(meta)), sorted(set(meta) - spec.meta)
        raise ProtocolError(f"a {kind!r} message needs meta {sorted(spec.meta)}: missing {missing}, unexpected {extra}")
    return spec
