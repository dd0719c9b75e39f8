"""Model configurations for the checkpoint presets.

Each preset is a function returning plain config dicts in the diffusers /
transformers constructor vocabulary, so the same dicts build random-weight
models (the tiny embedded checkpoint) or describe real ones (planning).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from configs.controls import MODALITIES  # noqa: F401 (the control registry's; presets name their modalities)

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
    embedded: bool = True
    """True: small enough to build with random weights on first use. False: configs only (``--plan``)."""
    shipped: Path | None = None
    """Trained weights shipped in the repository (the ``demo`` preset): used as they are, never rebuilt."""

    def text_config(self, **overrides):
        """The text encoder's ``transformers`` config object (``overrides`` e.g. a tokenizer's ids)."""
        if self.text_encoder_type == "t5":
            from transformers import T5Config

            return T5Config(**{**self.text_encoder, **overrides})
        from transformers import Qwen2_5_VLConfig

        te = dict(self.text_encoder)
        te["text_config"] = dict(te["text_config"], **overrides)
        return Qwen2_5_VLConfig(**overrides, **te)


def _tiny_dit(text_dim: int, crossattn_in: int | None, heads: int = 2) -> tuple[dict, dict]:
    """Tiny transformer + controlnet configs known to run on CPU (diffusers' own test sizes); ``heads`` of 16
    channels each (Cosmos' RoPE needs at least 12 per head)."""
    hidden = 16 * heads
    shared = dict(
        num_attention_heads=heads,
        attention_head_dim=16,
        mlp_ratio=2.0,
        text_embed_dim=text_dim if crossattn_in is None else 32,
        adaln_lora_dim=4,
        max_size=(32, 32, 32),
        patch_size=(1, 2, 2),
        rope_scale=(1.0, 3.0, 3.0),
        extra_pos_embed_type=None,
        img_context_dim_in=24,
        img_context_dim_out=hidden,
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
        model_channels=hidden,
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


def tiny_4head() -> CheckpointConfig:
    """``tiny`` with 4 attention heads (64 channels): sequence parallelism over 4 ranks splits its heads."""
    base = tiny()
    transformer, controlnet = _tiny_dit(text_dim=32, crossattn_in=None, heads=4)
    return CheckpointConfig("tiny-4head", "t5", base.text_encoder, transformer, controlnet, dict(TINY_VAE))


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


#: The demo VAE (``scripts/train_demo.py``): 4x spatial, 2x temporal compression, 16 latent channels, 0.49M
#: parameters; the shipped config carries the latents' measured per-channel mean and std in place of 0 / 1.
DEMO_VAE = dict(
    base_dim=8,
    z_dim=16,
    dim_mult=[1, 2, 4],
    num_res_blocks=1,
    temperal_downsample=[False, True],
    latents_mean=[0.0] * 16,
    latents_std=[1.0] * 16,
)
#: Where the trained demo checkpoint is shipped (diffusers layout, written by ``train_demo.py --stage export``).
DEMO_CHECKPOINT = Path(__file__).resolve().parents[1] / "demo" / "checkpoint"


def demo() -> CheckpointConfig:
    """The trained demo checkpoint (the default): a DiT (4 layers, 4 heads x 32) and an edge ControlNet (4 blocks)
    trained on the demo world (``demo.world``: colored shapes at 64 x 64) with a small T5 (2 layers, d_model 64,
    trained along) over a word-level tokenizer of the world's words. ``vocab_size`` 128 leaves room for the
    character tokenizer ``--random_weights`` builds."""
    transformer, controlnet = _tiny_dit(text_dim=64, crossattn_in=None, heads=4)
    text_encoder = dict(
        d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=128,
        relative_attention_num_buckets=16, relative_attention_max_distance=32,
        dropout_rate=0.0, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
    )
    for cfg in (transformer, controlnet):
        cfg.update(attention_head_dim=32, img_context_dim_out=128, max_size=(16, 32, 32))
    transformer.update(num_layers=4)
    controlnet.update(n_controlnet_blocks=4, model_channels=128)
    return CheckpointConfig("demo", "t5", text_encoder, transformer, controlnet, dict(DEMO_VAE),
                            modalities=("edge",), shipped=DEMO_CHECKPOINT)


#: Wan2.1 VAE (AutoencoderKLWan defaults): 8x spatial, 4x temporal, 16 latent channels.
WAN21_VAE = dict(
    base_dim=96,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
)

#: Cosmos-Reason1-7B = Qwen2.5-VL-7B-Instruct's architecture (28 layers x 3584 -> 100352 when concatenated).
REASON1_7B = dict(
    text_config=dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6,
        rope_theta=1000000.0, rope_scaling={"type": "mrope", "rope_type": "default", "mrope_section": [16, 24, 24]},
        tie_word_embeddings=False,
    ),
    vision_config=dict(
        depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
        in_chans=3, tokens_per_second=2,
    ),
    vocab_size=152064,
    hidden_size=3584,
    tie_word_embeddings=False,
)

#: google-t5/t5-11b, encoder only (the cosmos-transfer1 / Cosmos 1-2 text encoder): 1024-channel embeddings.
T5_11B = dict(
    d_model=1024, d_kv=128, d_ff=65536, num_layers=24, num_heads=128, vocab_size=32128,
    relative_attention_num_buckets=32, dropout_rate=0.0, feed_forward_proj="relu", is_encoder_decoder=False,
)


def _transfer25_2b_dit(crossattn: bool) -> tuple[dict, dict]:
    """Cosmos-Transfer2.5-2B DiT + ControlNet (diffusers' conversion script, 'Cosmos-2.5-Transfer-General-2B')."""
    shared = dict(
        num_attention_heads=16, attention_head_dim=128, mlp_ratio=4.0, text_embed_dim=1024, adaln_lora_dim=256,
        max_size=(128, 240, 240), patch_size=(1, 2, 2), rope_scale=(1.0, 3.0, 3.0), extra_pos_embed_type=None,
        img_context_dim_in=1152, img_context_dim_out=2048, use_crossattn_projection=crossattn,
        crossattn_proj_in_channels=100352, encoder_hidden_states_channels=1024,
    )
    transformer = dict(shared, in_channels=16 + 1, out_channels=16, num_layers=28, concat_padding_mask=True,
                       controlnet_block_every_n=7, img_context_num_tokens=256)
    controlnet = dict(shared, n_controlnet_blocks=4, model_channels=2048, in_channels=130, latent_channels=18)
    return transformer, controlnet


def transfer25_2b() -> CheckpointConfig:
    """Cosmos-Transfer2.5-2B as released: Cosmos-Reason1-7B text encoder, Wan2.1 VAE. Configs only."""
    transformer, controlnet = _transfer25_2b_dit(crossattn=True)
    return CheckpointConfig("transfer2.5-2b", "qwen2_5_vl", dict(REASON1_7B), transformer, controlnet,
                            dict(WAN21_VAE), embedded=False)


def transfer25_2b_t5() -> CheckpointConfig:
    """The Transfer2.5-2B DiT fed by a T5-11B encoder (1024-channel embeddings, no cross-attn projection).
    Configs only: the memory plan of the cosmos-transfer1-style text stage."""
    transformer, controlnet = _transfer25_2b_dit(crossattn=False)
    return CheckpointConfig("transfer2.5-2b-t5-11b", "t5", dict(T5_11B), transformer, controlnet,
                            dict(WAN21_VAE), embedded=False)


def transfer25_2b_small() -> CheckpointConfig:
    """Transfer2.5-2B's structure at reduced size, for CPU tests of ``--random_weights`` and ``real_size.py --small``:
    the same classes and wiring (Qwen2.5-VL full-concat embeddings through the cross-attn projection, a ControlNet
    block every ``n`` transformer blocks, 130-channel control input, Wan VAE with 8x spatial / 4x temporal
    compression), fewer layers and narrower widths. Configs only."""
    layers, hidden = 2, 64
    transformer, controlnet = _transfer25_2b_dit(crossattn=True)
    small = dict(num_attention_heads=2, attention_head_dim=32, adaln_lora_dim=16, img_context_dim_in=32,
                 img_context_dim_out=64, crossattn_proj_in_channels=layers * hidden, text_embed_dim=64,
                 encoder_hidden_states_channels=64)
    transformer = dict(transformer, **small, num_layers=4, controlnet_block_every_n=2, img_context_num_tokens=4)
    controlnet = dict(controlnet, **small, n_controlnet_blocks=2, model_channels=64)
    text_encoder = dict(
        text_config=dict(REASON1_7B["text_config"], hidden_size=hidden, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=1024,
                         rope_scaling={"type": "mrope", "rope_type": "default", "mrope_section": [4, 6, 6]},
                         bos_token_id=None, eos_token_id=None),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=hidden),
        hidden_size=hidden, bos_token_id=None, eos_token_id=None,  # the real ids lie beyond the small vocabulary
    )
    vae = dict(WAN21_VAE, base_dim=16, num_res_blocks=1)
    return CheckpointConfig("transfer2.5-2b-small", "qwen2_5_vl", text_encoder, transformer, controlnet, vae,
                            embedded=False)


PRESETS = {"demo": demo, "tiny": tiny, "tiny-4head": tiny_4head, "tiny-reason": tiny_reason, "transfer2.5-2b": transfer25_2b,
           "transfer2.5-2b-t5-11b": transfer25_2b_t5, "transfer2.5-2b-small": transfer25_2b_small}


def checkpoint_presets() -> tuple[str, ...]:
    """Every ``--checkpoint_preset``: Transfer2.5's (``PRESETS``) and Cosmos 3's (``configs.cosmos3``)."""
    from configs.cosmos3 import COSMOS3_PRESETS

    return tuple(sorted({*PRESETS, *COSMOS3_PRESETS}))


def preset(name: str) -> CheckpointConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown checkpoint preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]()
