"""``seg``: objects named by a text prompt, boxed by GroundingDINO on the first frame and tracked through
the video by SAM2, drawn as a colour map (one colour per object, black background).

Weights (transformers, local folders): ``{preprocessor_dir}/seg/detector`` --
``AutoModelForZeroShotObjectDetection`` + its processor (e.g. IDEA-Research/grounding-dino-tiny) -- and
``{preprocessor_dir}/seg/sam2`` -- ``Sam2VideoModel`` + ``Sam2VideoProcessor`` (e.g. facebook/sam2.1-hiera-large).
The prompt is the control's ``input_control_prompt``, else the request's prompt.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
import torch
from loguru import logger

from preprocessors import check_models
from preprocessors._models import device, load


@dataclass(frozen=True)
class Config:
    model_dir: str | None = None
    box_threshold: float = 0.35
    text_threshold: float = 0.25
    max_objects: int = 16

    @classmethod
    def from_options(cls, options: dict) -> "Config":
        return cls(options.get("model_dir"))


def palette(n: int) -> np.ndarray:
    """``n`` well separated, fixed RGB colours (golden-ratio hue steps)."""
    return np.array([[round(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.85, 1.0)] for i in range(n)],
                    dtype=np.uint8)


def segment_prompt(request) -> str:
    control = request.controls.get("seg")
    text = (control.prompt if control is not None and control.prompt else request.prompt).strip().lower()
    return text if text.endswith(".") else text + "."  # GroundingDINO reads phrases ending in "."


class Preprocessor:
    def __init__(self, config: Config):
        self.config = config
        self.detector_path, self.sam_path = check_models("seg", config.model_dir)
        self.detector = None

    def key(self, request) -> dict:
        c = self.config
        return {"models": [str(self.detector_path), str(self.sam_path)], "prompt": segment_prompt(request),
                "box": c.box_threshold, "text": c.text_threshold, "max_objects": c.max_objects}

    def load(self) -> None:
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor, Sam2VideoModel, Sam2VideoProcessor

        self.device = device()
        self.detector_processor = AutoProcessor.from_pretrained(self.detector_path, local_files_only=True)
        self.detector = load(AutoModelForZeroShotObjectDetection, self.detector_path, self.device)
        self.sam_processor = Sam2VideoProcessor.from_pretrained(self.sam_path, local_files_only=True)
        self.sam = load(Sam2VideoModel, self.sam_path, self.device)

    def boxes(self, frame: np.ndarray, text: str) -> np.ndarray:
        """``x0, y0, x1, y1`` boxes of what ``text`` names in ``frame``, best first."""
        h, w = frame.shape[:2]
        inputs = self.detector_processor(images=frame, text=text, return_tensors="pt", truncation=True).to(self.device)
        found = self.detector_processor.post_process_grounded_object_detection(
            self.detector(**inputs), inputs.input_ids, threshold=self.config.box_threshold,
            text_threshold=self.config.text_threshold, target_sizes=[(h, w)])[0]
        order = found["scores"].float().argsort(descending=True)[: self.config.max_objects]
        return found["boxes"].float()[order].cpu().numpy()

    @torch.no_grad()
    def __call__(self, frames: np.ndarray, request) -> np.ndarray:
        if self.detector is None:
            self.load()
        text = segment_prompt(request)
        boxes = self.boxes(frames[0], text)
        out = np.zeros_like(frames)
        if not len(boxes):
            logger.warning(f"{request.name}: seg: nothing matching {text!r} in the first frame; the control is black")
            return out
        session = self.sam_processor.init_video_session(video=list(frames), inference_device=self.device,
                                                        dtype=self.sam.dtype)
        ids = list(range(1, len(boxes) + 1))
        self.sam_processor.add_inputs_to_inference_session(inference_session=session, frame_idx=0, obj_ids=ids,
                                                           input_boxes=[boxes.tolist()])
        self.sam(inference_session=session, frame_idx=0)
        colors = palette(len(ids))
        size = [[session.video_height, session.video_width]]
        for result in self.sam.propagate_in_video_iterator(session):
            masks = self.sam_processor.post_process_masks([result.pred_masks], original_sizes=size, binarize=True)[0]
            for color, mask in zip(colors, masks[:, 0].cpu().numpy()):
                out[result.frame_idx][mask] = color
        return out
