"""The VAE split over ranks by rows (``transfer.distributed.vae_split``) equals one rank's VAE: both families' forms of
``AutoencoderKLWan`` (Transfer2.5's Wan2.1, 16 channels; Cosmos 3's Wan2.2, 48 channels, patchified), degree 2 and 3
(uneven bands), encode and decode, on gloo with real process groups."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from configs.cosmos3 import cosmos3_tiny
from configs.models import TINY_VAE

#: (name, the VAE's config, pixel height and width): heights of 7 and 5 latent rows, so 3 ranks get uneven bands.
FAMILIES = {
    "transfer2.5": (dict(TINY_VAE), 56, 48),
    "cosmos3": ({k: v for k, v in cosmos3_tiny().vae.items()}, 80, 64),
}
FRAMES = 9


def build(config: dict):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(7)
    vae = AutoencoderKLWan(**config).eval()
    with torch.no_grad():  # weights far from diffusers' init (zero biases): every halo row matters
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae


def inputs(height: int, width: int, z_dim: int, ratio: int):
    g = torch.Generator().manual_seed(3)
    video = torch.rand(1, 3, FRAMES, height, width, generator=g) * 2 - 1
    latents = torch.randn(1, z_dim, 1 + (FRAMES - 1) // 4, height // ratio, width // ratio, generator=g)
    return video, latents


@torch.no_grad()
def run(vae, video, latents):
    return vae.encode(video).latent_dist.mode(), vae.decode(latents).sample


def _worker(rank: int, world: int, port: int, out: str) -> None:
    from transfer.distributed.vae_split import RowSplit, install

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    groups = {d: dist.new_group(list(range(d))) for d in (2, 3)}
    results = {}
    for name, (config, height, width) in FAMILIES.items():
        for degree, group in groups.items():
            vae = build(config)
            if rank < degree:
                install(vae, RowSplit(tuple(range(degree)), group, rank))
                video, latents = inputs(height, width, config["z_dim"], vae.spatial_compression_ratio)
                results[(name, degree)] = run(vae, video, latents)
            dist.barrier()
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def split_results(tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path_factory.mktemp("vae_split") / "results.pt")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(3, port, out), nprocs=3, join=True)
    return torch.load(out)


@pytest.mark.parametrize("degree", [2, 3])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_split_vae_equals_one_rank(split_results, name, degree):
    config, height, width = FAMILIES[name]
    vae = build(config)
    video, latents = inputs(height, width, config["z_dim"], vae.spatial_compression_ratio)
    want_latents, want_frames = run(vae, video, latents)
    got_latents, got_frames = split_results[(name, degree)]
    assert got_latents.shape == want_latents.shape and got_frames.shape == want_frames.shape
    assert want_latents.abs().max() > 0.1 and want_frames.std() > 0.01  # not a degenerate model
    assert (got_latents - want_latents).abs().max() <= 1e-5
    assert ((got_frames + 1) * 127.5 - (want_frames + 1) * 127.5).abs().max() <= 1.0  # frames within one level
    assert (got_frames - want_frames).abs().max() <= 1e-5


def test_halo_rows_matter(split_results):
    """The split is exact only with the halos: the same bands encoded apart (no exchange) differ at band edges."""
    config, height, width = FAMILIES["transfer2.5"]
    vae = build(config)
    video, _ = inputs(height, width, config["z_dim"], vae.spatial_compression_ratio)
    with torch.no_grad():
        whole = vae.encode(video).latent_dist.mode()
        apart = torch.cat([vae.encode(video[..., :32, :]).latent_dist.mode(),
                           vae.encode(video[..., 32:, :]).latent_dist.mode()], dim=-2)
    assert (apart - whole).abs().max() > 1e-3
    assert (split_results[("transfer2.5", 2)][0] - whole).abs().max() <= 1e-5


def test_bands():
    from transfer.distributed.vae_split import bands
    from transfer.errors import TransferError

    assert bands(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert bands(4, 2) == [(0, 2), (2, 4)]
    with pytest.raises(TransferError, match="cannot split 2 latent rows over 3 ranks"):
        bands(2, 3)
