"""Video guard: pixelate faces found by YuNet (OpenCV's ``FaceDetectorYN``), whose ONNX model ships with this package.

YuNet (Wu, Peng, Yu 2023; opencv_zoo ``face_detection_yunet``, MIT licence, ``data/face_detection_yunet.LICENSE``)
is a 230 KB CNN face detector that OpenCV 4.5.4+ and 5.x run with their own DNN module: the same detector on every
supported OpenCV, offline, CPU-only. (OpenCV 5 wheels no longer ship the Haar cascades this guard used before; the
cascade also found "faces" in shape-only videos.) Upstream uses RetinaFace, a larger CNN of the same family (anchor
boxes with landmarks); YuNet is its small counterpart, at 0.88 / 0.87 / 0.75 AP on WIDER Face easy / medium / hard.

Each frame is searched at most ``DETECT_SIDE`` pixels on its long side (boxes are scaled back); every face at least
``min_size`` pixels (in the full frame) with a score of at least ``confidence`` is pixelated into ``blocks`` x
``blocks`` cells, with a margin so the hairline and chin go too. Frames without a detection are returned untouched
(bit for bit). The detector runs on one OpenCV thread, so its scores do not depend on the machine's thread count.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from transfer.errors import TransferError

MODEL = Path(__file__).parent / "data" / "face_detection_yunet.onnx"
DETECT_SIDE = 640
MARGIN = 0.15
#: YuNet's score threshold in opencv_zoo's demo.
DEFAULT_CONFIDENCE = 0.9


class FacePixelationGuard:
    name = "faces"

    def __init__(self, min_size: int = 20, confidence: float = DEFAULT_CONFIDENCE, blocks: int = 8,
                 model_path: str | Path | None = None):
        path = Path(model_path or MODEL)
        if not path.is_file():
            raise TransferError(f"face detector model {path} not found (it ships in the guardrails package); "
                                "reinstall, or turn face pixelation off (--face_pixelation off)")
        level = cv2.utils.logging.getLogLevel()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # OpenCV 5 warns that its new DNN engine
        try:                                                                # ignores the (default) CPU target
            self.detector = cv2.FaceDetectorYN.create(str(path), "", (DETECT_SIDE, DETECT_SIDE), confidence, 0.3, 5000)
        except cv2.error as e:
            raise TransferError(f"cannot load face detector {path}: {str(e).strip().splitlines()[-1]}") from None
        finally:
            cv2.utils.logging.setLogLevel(level)
        self.min_size, self.confidence, self.blocks = min_size, confidence, blocks

    def detect(self, frame: np.ndarray) -> list[tuple[int, int, int, int]]:
        """Face boxes ``(x, y, w, h)`` in an RGB uint8 frame."""
        h, w = frame.shape[:2]
        scale = min(1.0, DETECT_SIDE / max(h, w))
        bgr = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)
        if scale < 1.0:
            bgr = cv2.resize(bgr, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            self.detector.setInputSize((bgr.shape[1], bgr.shape[0]))
            _, faces = self.detector.detect(bgr)
        finally:
            cv2.setNumThreads(threads)
        boxes = []
        for face in [] if faces is None else faces:
            x, y, bw, bh = (v / scale for v in face[:4])
            x0, y0 = max(0, round(x)), max(0, round(y))
            x1, y1 = min(w, round(x + bw)), min(h, round(y + bh))
            if min(x1 - x0, y1 - y0) >= self.min_size and face[14] >= self.confidence:
                boxes.append((x0, y0, x1 - x0, y1 - y0))
        return boxes

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
