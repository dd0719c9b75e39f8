"""``keypoint``: people found by a detector, their COCO-17 keypoints by ViTPose, drawn as an OpenPose-style
skeleton on black.

Weights (transformers, local folders): ``{preprocessor_dir}/keypoint/detector`` -- an
``AutoModelForObjectDetection`` with a ``person`` label (e.g. RT-DETR) -- and
``{preprocessor_dir}/keypoint/pose`` -- ``VitPoseForPoseEstimation`` (e.g. usyd-community/vitpose-base-simple).
Upstream uses RTMPose whole-body; ViTPose is the pose model transformers carries.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from preprocessors import check_models
from preprocessors._models import batches, device, load
from transfer.errors import TransferError

#: COCO-17 limbs (keypoint index pairs) and OpenPose's limb colours (RGB).
LIMBS = [(15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8), (7, 9), (8, 10),
         (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6)]
COLORS = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
          (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
          (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85), (255, 255, 255)]


@dataclass(frozen=True)
class Config:
    model_dir: str | None = None
    person_threshold: float = 0.5
    keypoint_threshold: float = 0.3
    max_people: int = 16

    @classmethod
    def from_options(cls, options: dict) -> "Config":
        return cls(options.get("model_dir"))


def draw_skeleton(canvas: np.ndarray, keypoints: np.ndarray, scores: np.ndarray, threshold: float) -> None:
    """Draw one person's limbs and joints onto ``canvas`` (RGB uint8) in place."""
    thickness = max(1, round(min(canvas.shape[:2]) / 160))
    visible = scores >= threshold
    for (a, b), color in zip(LIMBS, COLORS):
        if visible[a] and visible[b]:
            pa, pb = tuple(int(v) for v in keypoints[a]), tuple(int(v) for v in keypoints[b])
            cv2.line(canvas, pa, pb, color, thickness * 2, cv2.LINE_AA)
    for i in np.flatnonzero(visible):
        cv2.circle(canvas, tuple(int(v) for v in keypoints[i]), thickness * 2, COLORS[i % len(COLORS)], -1, cv2.LINE_AA)


class Preprocessor:
    def __init__(self, config: Config):
        self.config = config
        self.detector_path, self.pose_path = check_models("keypoint", config.model_dir)
        self.detector = None

    def key(self, request) -> dict:
        c = self.config
        return {"models": [str(self.detector_path), str(self.pose_path)], "person": c.person_threshold,
                "keypoint": c.keypoint_threshold, "max_people": c.max_people}

    def load(self) -> None:
        from transformers import AutoImageProcessor, AutoModelForObjectDetection, VitPoseForPoseEstimation

        self.device = device()
        self.detector_processor = AutoImageProcessor.from_pretrained(self.detector_path, local_files_only=True)
        self.detector = load(AutoModelForObjectDetection, self.detector_path, self.device)
        people = [int(i) for i, name in self.detector.config.id2label.items() if str(name).lower() == "person"]
        if not people:
            raise TransferError(f"keypoint detector {self.detector_path} has no 'person' label")
        self.person = people[0]
        self.pose_processor = AutoImageProcessor.from_pretrained(self.pose_path, local_files_only=True)
        self.pose = load(VitPoseForPoseEstimation, self.pose_path, self.device)

    def people(self, frames: np.ndarray) -> list[np.ndarray]:
        """Person boxes per frame, COCO ``x, y, w, h``, best first."""
        h, w = frames.shape[1:3]
        inputs = self.detector_processor(images=list(frames), return_tensors="pt").to(self.device)
        found = self.detector_processor.post_process_object_detection(
            self.detector(**inputs), target_sizes=[(h, w)] * len(frames), threshold=self.config.person_threshold)
        out = []
        for f in found:
            keep = (f["labels"] == self.person).cpu()
            boxes = f["boxes"].float().cpu()[keep][: self.config.max_people].numpy()
            out.append(np.stack([boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], 1)
                       if len(boxes) else np.zeros((0, 4), np.float32))
        return out

    @torch.no_grad()
    def __call__(self, frames: np.ndarray, request=None) -> np.ndarray:
        if self.detector is None:
            self.load()
        canvas = np.zeros_like(frames)
        for part in batches(len(frames)):
            chunk = frames[part]
            boxes = self.people(chunk)
            with_people = [i for i, b in enumerate(boxes) if len(b)]
            if not with_people:
                continue
            inputs = self.pose_processor(images=[chunk[i] for i in with_people], boxes=[boxes[i] for i in with_people],
                                         return_tensors="pt").to(self.device)
            poses = self.pose_processor.post_process_pose_estimation(self.pose(**inputs),
                                                                      boxes=[boxes[i] for i in with_people])
            for i, people in zip(with_people, poses):
                for person in people:
                    draw_skeleton(canvas[part.start + i], person["keypoints"].float().cpu().numpy(),
                                  person["scores"].float().cpu().numpy(), self.config.keypoint_threshold)
        return canvas
