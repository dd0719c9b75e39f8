"""Test-only fault injection for stage processes, loaded at interpreter start (``PYTHONPATH=tests/faults``).

``TRANSFER_TEST_FAULT=RANK:STAGE``: in the process of that rank, one stage method raises -- as a CUDA out-of-memory
error would on a GPU -- for the test's "poison" request only (128 pixels high; the others are 96), so a test can see
one request fail inside a stage process and the rest of the batch go on. ``RANK:stock_processor``: a
sequence-parallel rank keeps diffusers' stock attention processor on one module (which attends within its shard). ``TRANSFER_TEST_FAULT=0:finalizer`` (one
process): after the first VAE decode, SIGTERM arrives while Python runs an object's ``__del__``, where the signal
handler's exception is printed and dropped ("Exception ignored in"), as it was seen to happen inside imageio's reader
finalizer. ``TRANSFER_TEST_FAULT=RANK:late_shard``: that rank (a DiT group's leader) sends each ``shard_chunk`` to
rank WORLD_SIZE - 2 one second late (6 ranks: the last of the preset's group [1, 2, 3, 4]), so that rank gets its
counterpart's first velocity before its own chunk; every rank prints ``early velocity`` when that happens. Nothing in
the product reads this variable.
"""

import os
import signal
import sys

_fault = os.environ.get("TRANSFER_TEST_FAULT", "")
if _fault.endswith(":late_shard"):
    from transfer.distributed import dit_group

    _on_velocity = dit_group.DiTRole.on_velocity

    def on_velocity(self, msg):
        print(f"rank {self.rank}: early velocity {msg.meta}", file=sys.stderr, flush=True)
        _on_velocity(self, msg)

    dit_group.DiTRole.on_velocity = on_velocity
    if os.environ.get("RANK", "0") == _fault.split(":")[0]:
        import time

        from transfer.distributed import transport

        class LateTransport(transport.TorchTransport):
            """The stage processes' transport, delivering one kind of message late (its wire, ``deliver``)."""

            def deliver(self, dst, kind, meta, tensors):
                if kind == "shard_chunk" and dst == int(os.environ["WORLD_SIZE"]) - 2:
                    time.sleep(1.0)
                super().deliver(dst, kind, meta, tensors)

        from transfer.distributed import rank_loop

        rank_loop.TorchTransport = LateTransport  # the implementation the runtime builds
elif _fault and os.environ.get("RANK", "0") == _fault.split(":")[0]:
    from transfer.families.transfer25 import models as stages, text_encoding

    POISON_HEIGHT = 128
    stage = _fault.split(":")[1]

    def _oom():
        raise RuntimeError("CUDA out of memory (injected by tests/faults)")

    def _wrap(cls, name, is_poison):
        original = getattr(cls, name)

        def method(self, *args, **kwargs):
            if is_poison(*args):
                _oom()
            return original(self, *args, **kwargs)

        setattr(cls, name, method)

    if stage == "text":
        _wrap(text_encoding.TextEncoder, "encode", lambda prompt: "poison" in prompt)
    elif stage == "vae":  # encoding the control video of one chunk
        _wrap(stages.VideoVAE, "encode", lambda video, *a: video.shape[-2] == POISON_HEIGHT)
    elif stage == "dit":
        _wrap(stages.Denoiser, "denoise", lambda *a: a[9][0] == POISON_HEIGHT)  # pixel size (height, width)
    elif stage == "partner":  # the negative branch of a CFG pair, set up per chunk on the partner rank
        _wrap(stages.Denoiser, "chunk_masks", lambda shape, n, pixel: pixel[0] == POISON_HEIGHT)
    elif stage == "stock_processor":  # one self-attention module keeps diffusers' stock (shard-local) processor
        from diffusers.models.transformers.transformer_cosmos import CosmosAttnProcessor2_0

        from transfer.distributed import sequence_parallel

        _install = sequence_parallel.install_processors

        def install_processors(model):
            _install(model)
            sequence_parallel.self_attention_modules(model)[-1][1].set_processor(CosmosAttnProcessor2_0())

        sequence_parallel.install_processors = install_processors
    elif stage == "finalizer":

        class _SignalInFinalizer:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGTERM)
                sum(range(1000))  # bytecode, still inside __del__: the handler runs here

        _decode = stages.VideoVAE.decode

        def decode(self, *args, **kwargs):
            out = _decode(self, *args, **kwargs)
            if not getattr(decode, "fired", False):
                decode.fired = True
                _SignalInFinalizer()  # made and dropped at once: its __del__ runs now
            return out

        stages.VideoVAE.decode = decode
    else:
        raise ValueError(f"TRANSFER_TEST_FAULT: unknown stage {stage!r}")
