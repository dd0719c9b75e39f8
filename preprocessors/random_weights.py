"""Tiny random-weight preprocessor models in the layout ``--preprocessor_dir`` expects.

Written into the embedded tiny checkpoint (``CKPT/preprocessors/``) so a spec whose controls all
lack ``input_control`` runs on a fresh CPU machine, and loaded by exactly the code that loads real
weights. Random weights: depth is noise, boxes and keypoints land anywhere, masks may be empty.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch


def bert_tokenizer():
    """A character-level WordPiece BERT tokenizer built locally (GroundingDINO's text side)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + ".,")
    vocab = {t: i for i, t in enumerate(specials + chars + ["##" + c for c in chars])}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]", model_max_length=256)


def save_depth(out: Path) -> None:
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=56,
                            patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"], reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, fusion_hidden_size=16, neck_hidden_sizes=[8, 16, 32, 32],
                                 reassemble_hidden_size=32, head_hidden_size=8)
    DepthAnythingForDepthEstimation(config).save_pretrained(out)
    DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(out)


def save_seg(detector: Path, sam: Path) -> None:
    from transformers import (
        BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection, GroundingDinoImageProcessor,
        GroundingDinoProcessor, Sam2ImageProcessor, Sam2VideoConfig, Sam2VideoModel, Sam2VideoProcessor, SwinConfig,
    )
    from transformers.models.sam2.configuration_sam2 import (
        Sam2HieraDetConfig, Sam2MaskDecoderConfig, Sam2PromptEncoderConfig, Sam2VisionConfig,
    )
    from transformers.models.sam2_video.video_processing_sam2_video import Sam2VideoVideoProcessor

    tokenizer = bert_tokenizer()
    swin = SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=2,
                      out_features=["stage2", "stage3", "stage4"])
    text = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=256)
    config = GroundingDinoConfig(backbone_config=swin, text_config=text, d_model=32, encoder_layers=1, decoder_layers=2,
                                 encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2,
                                 num_queries=10, encoder_n_points=2, decoder_n_points=2, max_text_len=256)
    GroundingDinoForObjectDetection(config).save_pretrained(detector)
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 128}),
                           tokenizer=tokenizer).save_pretrained(detector)

    s = 128  # SAM2's memory attention needs widths that are multiples of 64; a global block must not open a stage
    hiera = Sam2HieraDetConfig(hidden_size=8, num_attention_heads=1, image_size=[s, s], blocks_per_stage=[1, 2, 2, 1],
                               embed_dim_per_stage=[8, 16, 32, 64], num_attention_heads_per_stage=[1, 1, 1, 1],
                               window_size_per_stage=[4, 4, 4, 4], global_attention_blocks=[2],
                               window_positional_embedding_background_size=[4, 4])
    vision = Sam2VisionConfig(backbone_config=hiera, backbone_channel_list=[64, 32, 16, 8], fpn_hidden_size=128,
                              backbone_feature_sizes=[[s // 4, s // 4], [s // 8, s // 8], [s // 16, s // 16]])
    config = Sam2VideoConfig(
        vision_config=vision, image_size=s, num_maskmem=3,
        prompt_encoder_config=Sam2PromptEncoderConfig(hidden_size=128, image_size=s, patch_size=16, mask_input_channels=4),
        mask_decoder_config=Sam2MaskDecoderConfig(hidden_size=128, num_hidden_layers=1, num_attention_heads=2, mlp_dim=64,
                                                  iou_head_hidden_dim=32),
        memory_attention_hidden_size=128, memory_attention_num_layers=1, memory_attention_feed_forward_hidden_size=64,
        memory_attention_rope_feat_sizes=[s // 16, s // 16], memory_encoder_hidden_size=128,
        memory_encoder_output_channels=64, mask_downsampler_embed_dim=128, memory_fuser_embed_dim=128,
        memory_fuser_intermediate_dim=64,
    )
    Sam2VideoModel(config).save_pretrained(sam)
    Sam2VideoProcessor(image_processor=Sam2ImageProcessor(size={"height": s, "width": s}),
                       video_processor=Sam2VideoVideoProcessor(size={"height": s, "width": s})).save_pretrained(sam)


def save_keypoint(detector: Path, pose: Path) -> None:
    from transformers import (
        RTDetrConfig, RTDetrForObjectDetection, RTDetrImageProcessor, RTDetrResNetConfig, VitPoseBackboneConfig,
        VitPoseConfig, VitPoseForPoseEstimation, VitPoseImageProcessor,
    )

    backbone = RTDetrResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], layer_type="basic",
                                  out_features=["stage2", "stage3", "stage4"])
    config = RTDetrConfig(backbone_config=backbone, encoder_hidden_dim=16, encoder_in_channels=[16, 32, 64], d_model=16,
                          feat_strides=[8, 16, 32], encoder_ffn_dim=32, encoder_attention_heads=2, decoder_layers=1,
                          decoder_attention_heads=2, decoder_ffn_dim=32, num_queries=10, num_feature_levels=3,
                          decoder_in_channels=[16, 16, 16], num_labels=1, id2label={0: "person"}, label2id={"person": 0},
                          num_denoising=0)
    RTDetrForObjectDetection(config).save_pretrained(detector)
    RTDetrImageProcessor(size={"height": 64, "width": 64}).save_pretrained(detector)
    vit = VitPoseBackboneConfig(image_size=[64, 48], patch_size=[16, 16], hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=32, out_features=["stage1"])
    VitPoseForPoseEstimation(VitPoseConfig(backbone_config=vit, num_labels=17)).save_pretrained(pose)
    VitPoseImageProcessor(size={"height": 64, "width": 48}).save_pretrained(pose)


def write_tiny_preprocessors(root: Path, seed: int = 0) -> Path:
    """All five folders under ``root`` (``--preprocessor_dir`` layout), from fixed seeds."""
    torch.manual_seed(seed + 100)
    save_depth(root / "depth")
    torch.manual_seed(seed + 101)
    save_seg(root / "seg" / "detector", root / "seg" / "sam2")
    torch.manual_seed(seed + 102)
    save_keypoint(root / "keypoint" / "detector", root / "keypoint" / "pose")
    return root
