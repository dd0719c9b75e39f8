"""Cosmos 3 checkpoint presets (NVIDIA Cosmos3-Nano / -Super: one model does transfer, hints as tokens).

Plain config dicts in diffusers' constructor vocabulary, as ``configs.models`` does for Transfer2.5, so the same
dicts build random-weight components (``cosmos3-tiny``, built on first use) or describe real ones (``cosmos3-nano``:
configs only, for planning and ``--random_weights``). The layout is diffusers': ``transformer/``
(``Cosmos3OmniTransformer``), ``vae/`` (``AutoencoderKLWan``, the Wan2.2 variant: 48 latent channels, 16x spatial,
4x temporal), ``scheduler/`` (``UniPCMultistepScheduler``), ``text_tokenizer/`` (the prompt goes to the
transformer's own language stream as token ids: there is no text encoder). No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: The hints Cosmos 3 transfer takes (diffusers' modular pipeline, in its canonical order); no per-hint weight.
HINTS = ("edge", "blur", "depth", "seg", "wsm")

#: UniPC with flow sigmas and shift 10 (diffusers' Cosmos 3 docs).
COSMOS3_SCHEDULER = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=10.0,
                         use_karras_sigmas=False)


@dataclass
class Cosmos3Config:
    """Everything needed to build a Cosmos 3 checkpoint folder from scratch (or to plan one)."""

    name: str
    transformer: dict
    vae: dict
    scheduler: dict = field(default_factory=lambda: dict(COSMOS3_SCHEDULER))
    vocab_size: int = 256
    """Tokenizer words (a word-level tokenizer for the embedded preset; the real one is Qwen's)."""
    hints: tuple[str, ...] = HINTS
    embedded: bool = True
    """True: small enough to build with random weights on first use. False: configs only."""


def _wan22_vae(**overrides) -> dict:
    """The Wan2.2 VAE (``AutoencoderKLWan``): 48 channels, residual, patch 2, 16x spatial and 4x temporal."""
    return dict(dict(base_dim=160, decoder_base_dim=256, z_dim=48, in_channels=12, out_channels=12, is_residual=True,
                     patch_size=2, dim_mult=[1, 2, 4, 4], num_res_blocks=2, scale_factor_spatial=16,
                     scale_factor_temporal=4, temperal_downsample=[False, True, True],
                     latents_mean=[0.0] * 48, latents_std=[1.0] * 48), **overrides)


def cosmos3_tiny() -> Cosmos3Config:
    """Random weights small enough for a CPU (diffusers' own test sizes for the transformer and the Wan2.2 VAE)."""
    transformer = dict(head_dim=8, hidden_act="silu", hidden_size=32, intermediate_size=64, latent_channel=48,
                       latent_patch_size=2, num_attention_heads=4, num_hidden_layers=2, num_key_value_heads=2,
                       patch_latent_dim=2 * 2 * 48, rope_axes_dim=[2, 1, 1], rope_theta=1e6, vocab_size=256)
    vae = _wan22_vae(base_dim=3, decoder_base_dim=None, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
    return Cosmos3Config("cosmos3-tiny", transformer, vae)


def cosmos3_nano() -> Cosmos3Config:
    """NVIDIA Cosmos3-Nano (16B): the transformer class's own defaults (36 layers, hidden 4096, 32 query / 8 KV heads,
    head dim 128, Qwen's 151,936-token vocabulary); the Wan2.2 VAE. Configs only (no download here)."""
    return Cosmos3Config("cosmos3-nano", dict(num_hidden_layers=36, hidden_size=4096, num_attention_heads=32,
                                              num_key_value_heads=8, head_dim=128, vocab_size=151936),
                         _wan22_vae(), vocab_size=151936, embedded=False)  # VAE latent mean/std: placeholders (sizes are what planning reads)


COSMOS3_PRESETS = {"cosmos3-tiny": cosmos3_tiny, "cosmos3-nano": cosmos3_nano}
