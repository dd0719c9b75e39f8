"""Video guard: pixelate faces, with OpenCV's Haar cascade (shipped in the opencv-python wheel).

Offline and CPU-only. Each frame is searched at most ``DETECT_SIDE`` pixels on its long side (boxes
are scaled back), every face at least ``min_size`` pixels (in the full frame) whose cascade
confidence (the final stage's level weight) reaches ``confidence`` is pixelated into
``blocks`` x ``blocks`` cells, with a margin so the hairline and chin go too. Frames without a
detection are returned untouched (bit for bit).
"""

from __future__ import annotations

import os

import cv2
import numpy as np

from transfer.errors import TransferError

CASCADE = "haarcascade_frontalface_default.xml"
DETECT_SIDE = 640
MARGIN = 0.15


class FacePixelationGuard:
    name = "faces"

    def __init__(self, min_size: int = 20, confidence: float = 1.0, blocks: int = 8, cascade_path: str | None = None):
        path = cascade_path or os.path.join(cv2.data.haarcascades, CASCADE)
        if not os.path.isfile(path):
            raise TransferError(f"face detector {path} not found: the opencv-python(-headless) 4.x wheel ships it; "
                                "install 'opencv-python-headless<5' or turn face pixelation off (--face_pixelation off)")
        self.detector = cv2.CascadeClassifier(path)
        if self.detector.empty():
            raise TransferError(f"cannot load face detector {path}")
        self.min_size, self.confidence, self.blocks = min_size, confidence, blocks

    def detect(self, frame: np.ndarray) -> list[tuple[int, int, int, int]]:
        """Face boxes ``(x, y, w, h)`` in an RGB uint8 frame."""
        h, w = frame.shape[:2]
        scale = min(1.0, DETECT_SIDE / max(h, w))
        gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        if scale < 1.0:
            gray = cv2.resize(gray, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        side = max(1, round(self.min_size * scale))
        boxes, _, weights = self.detector.detectMultiScale3(
            cv2.equalizeHist(gray), scaleFactor=1.1, minNeighbors=5, minSize=(side, side),
            outputRejectLevels=True)
        return [tuple(round(v / scale) for v in box) for box, weight in zip(boxes, np.ravel(weights))
                if weight >= self.confidence]

    def pixelate(self, frame: np.ndarray, box: tuple[int, int, int, int]) -> None:
        x, y, w, h = box
        mx, my = round(w * MARGIN), round(h * MARGIN)
        x0, y0 = max(0, x - mx), max(0, y - my)
        x1, y1 = min(frame.shape[1], x + w + mx), min(frame.shape[0], y + h + my)
        region = frame[y0:y1, x0:x1]
        small = cv2.resize(region, (self.blocks, self.blocks), interpolation=cv2.INTER_AREA)
        frame[y0:y1, x0:x1] = cv2.resize(small, (x1 - x0, y1 - y0), interpolation=cv2.INTER_NEAREST)

    def check_video_safety(self, frames: np.ndarray) -> np.ndarray:
        out = None
        for t, frame in enumerate(frames):
            boxes = self.detect(frame)
            if boxes and out is None:
                out = frames.copy()
            for box in boxes:
                self.pixelate(out[t], box)
        return frames if out is None else out  # the same array when nothing was found
