"""Control preprocessors (vis, edge, depth, seg, keypoint), loaded lazily.

Computing a control from the input video arrives with the preprocessors work; until
then a control without ``input_control`` is refused with a clear error.
"""

from __future__ import annotations

from transfer.errors import TransferError


def compute_control(modality: str, request):
    """Compute ``modality``'s control video from the request's input video (uint8 ``[T, H, W, 3]``)."""
    raise TransferError(
        f"{request.source or request.name}: control {modality!r} has no input_control; computing controls from the "
        f"input video is not yet supported -- give a precomputed control video as input_control"
    )
