"""Model configurations for the checkpoint presets.

Each preset is a function returning plain config dicts in the diffusers /
transformers constructor vocabulary, so the same dicts build random-weight
models (the tiny embedded checkpoint) or describe real ones (planning).
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Control modalities a checkpoint may carry a ControlNet for (cosmos-transfer1 spec keys).
MODALITIES = ("vis", "edge", "depth", "seg", "keypoint")

#: Transfer2.5 scheduler: UniPC with Karras + flow sigmas (diffusers' conversion script).
TRANSFER25_SCHEDULER = dict(
    use_karras_sigmas=True,
    use_flow_sigmas=True,
    prediction_type="flow_prediction",
    sigma_max=200.0,
    sigma_min=0.01,
)


@dataclass
class CheckpointConfig:
    """Everything needed to build a checkpoint directory from scratch."""

    name: str
    text_encoder_type: str
    """``t5`` (T5EncoderModel, last hidden state) or ``qwen2_5_vl`` (Cosmos-Reason1, full concat)."""
    text_encoder: dict
    transformer: dict
    controlnet: dict
    vae: dict
    scheduler: dict = field(default_factory=lambda: dict(TRANSFER25_SCHEDULER))
    modalities: tuple[str, ...] = MODALITIES


def _tiny_dit(text_dim: int, crossattn_in: int | None) -> tuple[dict, dict]:
    """Tiny transformer + controlnet configs known to run on CPU (diffusers' own test sizes)."""
    shared = dict(
        num_attention_heads=2,
        attention_head_dim=16,
        mlp_ratio=2.0,
        text_embed_dim=text_dim if crossattn_in is None else 32,
        adaln_lora_dim=4,
        max_size=(32, 32, 32),
        patch_size=(1, 2, 2),
        rope_scale=(1.0, 3.0, 3.0),
        extra_pos_embed_type=None,
        img_context_dim_in=24,
        img_context_dim_out=32,
        use_crossattn_projection=crossattn_in is not None,
        crossattn_proj_in_channels=crossattn_in or 1024,
        encoder_hidden_states_channels=32,
    )
    transformer = dict(
        shared,
        in_channels=16 + 1,
        out_channels=16,
        num_layers=2,
        concat_padding_mask=True,
        controlnet_block_every_n=1,
        img_context_num_tokens=4,
    )
    controlnet = dict(
        shared,
        n_controlnet_blocks=2,
        in_channels=16 + 1 + 1,
        latent_channels=16 + 1 + 1,
        model_channels=32,
    )
    return transformer, controlnet


TINY_VAE = dict(
    base_dim=3,
    z_dim=16,
    dim_mult=[1, 1, 1, 1],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
)


def tiny() -> CheckpointConfig:
    """The embedded default: T5 text encoder, every modality, a few hundred KB of random weights."""
    transformer, controlnet = _tiny_dit(text_dim=32, crossattn_in=None)
    text_encoder = dict(
        d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32,
        dropout_rate=0.0, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
    )
    return CheckpointConfig("tiny", "t5", text_encoder, transformer, controlnet, dict(TINY_VAE))


def tiny_reason() -> CheckpointConfig:
    """Tiny Transfer2.5 layout: Qwen2.5-VL text encoder, full-concat embeddings, cross-attn projection."""
    num_layers, hidden = 2, 32
    transformer, controlnet = _tiny_dit(text_dim=32, crossattn_in=num_layers * hidden)
    text_encoder = dict(
        text_config=dict(
            hidden_size=hidden, intermediate_size=32, num_hidden_layers=num_layers,
            num_attention_heads=2, num_key_value_heads=2,
            rope_scaling={"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
            rope_theta=1000000.0,
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=hidden),
        hidden_size=hidden,
    )
    return CheckpointConfig(
        "tiny-reason", "qwen2_5_vl", text_encoder, transformer, controlnet, dict(TINY_VAE), modalities=("edge", "vis")
    )


PRESETS = {"tiny": tiny, "tiny-reason": tiny_reason}


def preset(name: str) -> CheckpointConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown checkpoint preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]()
