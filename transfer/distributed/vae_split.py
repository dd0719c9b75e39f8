"""The VAE over several ranks: a chunk's encode and decode cut into bands of rows, each rank computing one, exactly.

``AutoencoderKLWan`` (both the Transfer2.5 form, Wan2.1 with 16 latent channels, and Cosmos 3's Wan2.2 with 48) is
built from causal 3-D convolutions, per-pixel RMS norms, 2x resampling and one attention block in each middle block
that attends over a whole frame. ``RowSplit`` gives each rank of a group a band of whole latent rows (so every
resolution level's band edges fall on its strides: the 2x2 blocks of downsampling, nearest-exact upsampling, Wan2.2's
patchify and its average / duplicate shortcuts never straddle two ranks) and patches the model's modules in place:

* every convolution whose kernel is taller than one row gets its neighbours' edge rows first (``HaloConv``: one row
  above and below for the 3x3 convolutions; one row below for the stride-2 downsampling after its bottom zero pad),
  then keeps only this band's output rows; a causal convolution's time cache holds this band's rows, and the cached
  frames are joined to the new ones before the exchange, so the halo of the cache comes with it;
* the attention of the middle blocks (``BandAttention``) gathers the frame's rows from every rank, runs the block on
  the whole frame and keeps this band's rows;
* everything else in the model works per pixel or per aligned block and runs unchanged on the band.

So a rank's band equals the same rows of one rank's result (no blending, no seams; the kernels may round differently
on fewer rows: tests bound it at 1e-5 on latents and 1 level on frames), and each rank's activations are 1/N of a
frame's plus one halo row per convolution. Outside ``RowSplit.active`` the patched modules are the model's own.

The halos travel by point-to-point exchanges with the two neighbouring ranks (``batch_isend_irecv``), the attention's
rows and the band results by ``all_gather`` on the group's process group; gloo on CPU, NCCL on GPUs.
"""

from __future__ import annotations

from contextlib import contextmanager
from types import MethodType

import torch
import torch.distributed as dist
from torch import nn

from transfer.distributed.sequence_parallel import gathered_sizes, padded_gather
from transfer.errors import TransferError


def bands(rows: int, degree: int) -> list[tuple[int, int]]:
    """``degree`` consecutive bands of ``rows`` latent rows, as even as they go (the larger ones first)."""
    if not 1 <= degree <= rows:
        raise TransferError(f"the VAE cannot split {rows} latent rows over {degree} ranks (each needs one row)")
    base, extra = divmod(rows, degree)
    sizes = [base + (i < extra) for i in range(degree)]
    starts = [sum(sizes[:i]) for i in range(degree)]
    return [(s, s + n) for s, n in zip(starts, sizes)]


class RowSplit:
    """This rank's place in a VAE group (``ranks``: global ranks in band order; ``group``: their process group) and
    the halo and gather collectives the patched modules call while ``active``."""

    def __init__(self, ranks: tuple[int, ...], group, rank: int):
        self.ranks, self.group = tuple(ranks), group
        self.index = self.ranks.index(rank)
        self.on = False

    @property
    def degree(self) -> int:
        return len(self.ranks)

    @contextmanager
    def active(self):
        self.on = True
        try:
            yield self
        finally:
            self.on = False

    def band(self, x: torch.Tensor, factor: int) -> torch.Tensor:
        """This rank's rows of ``x`` (dim -2), whose rows are ``factor`` per latent row."""
        rows = x.shape[-2]
        if rows % factor:
            raise TransferError(f"the VAE split needs a height that is a multiple of {factor}, got {rows}")
        start, stop = bands(rows // factor, self.degree)[self.index]
        return x[..., start * factor:stop * factor, :]

    def halo(self, x: torch.Tensor, top: int, bottom: int) -> tuple[torch.Tensor, int]:
        """``x`` with ``top`` rows of the band above and ``bottom`` rows of the band below (dim -2), none at the edges
        of the frame; returns it and the number of rows added on top."""
        i, n = self.index, self.degree
        if min(top, bottom) < 0 or max(top, bottom) > x.shape[-2]:
            raise TransferError(f"a band of {x.shape[-2]} rows cannot lend a halo of {max(top, bottom)} rows")
        ops, above, below = [], None, None
        if i > 0:
            if top:
                above = torch.empty_like(x[..., :top, :], memory_format=torch.contiguous_format)
                ops.append(dist.P2POp(dist.irecv, above, self.ranks[i - 1], self.group))
            if bottom:
                ops.append(dist.P2POp(dist.isend, x[..., :bottom, :].contiguous(), self.ranks[i - 1], self.group))
        if i < n - 1:
            if bottom:
                below = torch.empty_like(x[..., -bottom:, :], memory_format=torch.contiguous_format)
                ops.append(dist.P2POp(dist.irecv, below, self.ranks[i + 1], self.group))
            if top:
                ops.append(dist.P2POp(dist.isend, x[..., -top:, :].contiguous(), self.ranks[i + 1], self.group))
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        parts = [p for p in (above, x, below) if p is not None]
        return (torch.cat(parts, dim=-2) if len(parts) > 1 else x), (0 if above is None else top)

    def gather(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Every rank's band of ``x`` joined along dim -2 (on every rank), and where this rank's rows start in it."""
        sizes = gathered_sizes(x, x.dim() - 2, self.group)
        return padded_gather(x, x.dim() - 2, self.group, sizes), sum(sizes[:self.index])


class HaloConv(nn.Module):
    """A convolution (or a pad + convolution) run on a band with its neighbours' edge rows; ``stride`` rows in per
    row out. A causal 3-D convolution's cached frames (its ``cache_x``) are joined first and exchanged with it."""

    def __init__(self, inner: nn.Module, split: RowSplit, top: int, bottom: int, stride: int = 1):
        super().__init__()
        self.inner, self.top, self.bottom, self.stride = inner, top, bottom, stride
        self.split = split

    def forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        split = self.split
        if not split.on:
            return self.inner(x) if cache_x is None else self.inner(x, cache_x)
        cached = 0
        if cache_x is not None:
            cached = cache_x.shape[2]
            x = torch.cat([cache_x.to(x.device), x], dim=2)
        rows = x.shape[-2]
        x, added = split.halo(x, self.top, self.bottom)
        out = self.inner(x[:, :, cached:], x[:, :, :cached]) if cached else self.inner(x)
        start = added // self.stride
        return out[..., start:start + rows // self.stride, :]


class BandAttention(nn.Module):
    """diffusers' ``WanAttentionBlock`` (single-head attention over a whole frame) for a band: the block itself on the
    gathered frame, this band's rows kept. Every rank computes the whole frame's attention: at the middle block's
    resolution (1/8 of the frame's side for Wan2.1, 1/16 for Wan2.2) that is small (Wan2.1 at 720p: 14,080 tokens x
    384 channels, about 7 TFLOP per 93-frame call, tens of milliseconds on an H200 against seconds for the call),
    and it keeps the block's own arithmetic: the band equals one rank's rows by construction."""

    def __init__(self, inner: nn.Module, split: RowSplit):
        super().__init__()
        self.inner = inner
        self.split = split

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        split = self.split
        if not split.on:
            return self.inner(x)
        frame, offset = split.gather(x)
        return self.inner(frame)[..., offset:offset + x.shape[-2], :]


def install(vae: nn.Module, split: RowSplit) -> None:
    """Patch ``vae`` for ``split`` (once; the weights stay where they are): its encoder's and decoder's modules, and
    its ``_encode`` / ``_decode``, which then take this rank's band of the whole input, run it with ``split`` active
    and return the whole result gathered from every rank. Callers (``stages.VideoVAE``, diffusers' Cosmos 3 blocks)
    do not change; every rank of the group calls ``encode`` / ``decode`` together on the same input. Refuses a model
    with a convolution taller than one row that it does not know how to exchange halos for."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock, WanCausalConv3d, WanResample

    if getattr(vae, "_row_split", None) is not None:
        raise TransferError("the VAE is already split over ranks")
    replace: dict[str, nn.Module] = {}
    for name, module in [*vae.encoder.named_modules(prefix="encoder"), *vae.decoder.named_modules(prefix="decoder")]:
        if isinstance(module, WanCausalConv3d) and module.kernel_size[1] > 1:
            if module.stride[1] != 1 or module._padding[2] * 2 + 1 != module.kernel_size[1]:
                raise TransferError(f"the VAE split cannot exchange halos for {name} ({module})")
            pad = module._padding[2]
            replace[name] = HaloConv(module, split, pad, pad)
        elif isinstance(module, WanResample) and module.mode.startswith("downsample"):
            replace[f"{name}.resample"] = HaloConv(module.resample, split, 0, 1, stride=2)  # ZeroPad2d((0,1,0,1)) + 3x3/2
        elif isinstance(module, WanResample) and module.mode.startswith("upsample"):
            replace[f"{name}.resample.1"] = HaloConv(module.resample[1], split, 1, 1)  # nearest-exact 2x + 3x3 pad 1
        elif isinstance(module, WanAttentionBlock):
            replace[name] = BandAttention(module, split)
    covered = {id(m) for wrapper in replace.values() for m in wrapper.inner.modules()}
    for name, module in [*vae.encoder.named_modules(prefix="encoder"), *vae.decoder.named_modules(prefix="decoder")]:
        if isinstance(module, (nn.Conv2d, nn.Conv3d)) and module.kernel_size[-2] > 1 and id(module) not in covered:
            raise TransferError(f"the VAE split does not know how to split {name} ({type(module).__name__})")
    for name, wrapper in replace.items():
        parent, _, child = name.rpartition(".")
        setattr(vae.get_submodule(parent), child, wrapper)
    _split_calls(vae, split)
    vae._row_split = split


def _split_calls(vae: nn.Module, split: RowSplit) -> None:
    encode, decode = vae._encode, vae._decode
    ratio = vae.spatial_compression_ratio  # pixel rows per latent row (Wan2.2: its patchify included)

    def split_encode(self, x: torch.Tensor) -> torch.Tensor:
        with split.active():
            moments = encode(split.band(x, ratio))
        return split.gather(moments)[0]

    def split_decode(self, z: torch.Tensor, return_dict: bool = True):
        from diffusers.models.autoencoders.vae import DecoderOutput

        with split.active():
            frames = decode(split.band(z, 1), return_dict=False)[0]
        frames = split.gather(frames)[0]
        return DecoderOutput(sample=frames) if return_dict else (frames,)

    vae._encode, vae._decode = MethodType(split_encode, vae), MethodType(split_decode, vae)


class VAEService:
    """A leader's VAE calls made by every rank of its group, for a caller that runs on the leader alone (Cosmos 3's
    lockstep ranks, where diffusers' blocks call ``vae.encode`` / ``vae.decode`` on rank 0): the leader's
    ``_encode`` / ``_decode`` first broadcast their input over the group; the other ranks ``serve`` them until the
    leader's ``session`` ends. The split calls (``install``) then run together on every rank."""

    def __init__(self, vae: nn.Module, split: RowSplit):
        self.vae, self.split = vae, split
        self.leader = split.ranks[0]
        self.open = False
        if split.index == 0:
            encode, decode = vae._encode, vae._decode
            vae._encode = lambda x: (self._announce("encode", x), encode(x))[1]
            vae._decode = lambda z, return_dict=True: (self._announce("decode", z), decode(z, return_dict))[1]

    def _announce(self, op: str | None, x: torch.Tensor | None = None) -> None:
        if not self.open:  # the others would never join it
            raise RuntimeError("a split VAE call outside VAEService.session")
        head = [None if op is None else (op, tuple(x.shape), x.dtype)]
        dist.broadcast_object_list(head, src=self.leader, group=self.split.group, device=torch.device("cpu"))
        if op is not None:
            dist.broadcast(x.contiguous(), src=self.leader, group=self.split.group)

    @contextmanager
    def session(self):
        """The leader: the VAE calls inside are every rank's; at the end the others stop serving."""
        self.open = True
        yield
        self._announce(None)  # not after an error: the others may be inside a call's collectives; the run ends
        self.open = False

    def serve(self) -> None:
        """Another rank: make each call the leader announces, on this rank's band, until its session ends."""
        device = next(self.vae.parameters()).device
        while True:
            head = [None]
            dist.broadcast_object_list(head, src=self.leader, group=self.split.group, device=torch.device("cpu"))
            if head[0] is None:
                return
            op, shape, dtype = head[0]
            x = torch.empty(shape, dtype=dtype, device=device)
            dist.broadcast(x, src=self.leader, group=self.split.group)
            with torch.no_grad():
                self.vae._encode(x) if op == "encode" else self.vae._decode(x, return_dict=False)
