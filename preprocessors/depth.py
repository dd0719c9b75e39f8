"""``depth``: Depth-Anything (transformers ``AutoModelForDepthEstimation``) from ``{preprocessor_dir}/depth``.

Upstream uses Depth-Anything-V2-Small. The model predicts relative inverse depth per frame; it is
resized to the frame, normalised over the whole video (one min and max, so brightness does not
flicker from frame to frame: near is bright) and written as a gray 3-channel video.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from preprocessors import check_models
from preprocessors._models import batches, device, load


@dataclass(frozen=True)
class Config:
    model_dir: str | None = None

    @classmethod
    def from_options(cls, options: dict) -> "Config":
        return cls(options.get("model_dir"))


class Preprocessor:
    def __init__(self, config: Config):
        (self.path,) = check_models("depth", config.model_dir)
        self.model = self.processor = None

    def key(self, request) -> dict:
        return {"model": str(self.path)}

    def load(self) -> None:
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        self.device = device()
        self.processor = AutoImageProcessor.from_pretrained(self.path, local_files_only=True)
        self.model = load(AutoModelForDepthEstimation, self.path, self.device)

    @torch.no_grad()
    def __call__(self, frames: np.ndarray, request=None) -> np.ndarray:
        if self.model is None:
            self.load()
        h, w = frames.shape[1:3]
        depth = []
        for part in batches(len(frames)):
            inputs = self.processor(images=list(frames[part]), return_tensors="pt").to(self.device)
            out = self.processor.post_process_depth_estimation(self.model(**inputs), target_sizes=[(h, w)] * len(frames[part]))
            depth += [o["predicted_depth"].float().cpu() for o in out]
        d = torch.stack(depth)
        d = (d - d.min()) / (d.max() - d.min()).clamp_min(1e-8)
        gray = (d * 255).round().to(torch.uint8).numpy()
        return np.repeat(gray[..., None], 3, axis=-1)
