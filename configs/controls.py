"""The control registry: every control type this fork knows, in one table.

The modalities a spec may name (``MODALITIES``: cosmos-transfer1 spec keys, checkpoint ``controlnet/<name>/`` folders,
``--model`` choices), which ones cosmos-transfer2.5 itself has, each one's Transfer2.5 spec extras, the preprocessor
module that computes it from the input video and the weight folders that preprocessor loads under
``--preprocessor_dir`` all derive from ``CONTROLS``. Adding a control = one entry here + its preprocessor module
(``preprocessors/<name>.py``: ``Config.from_options``, ``Preprocessor``) + its test weights (``preprocessors/random_weights.py``)
+ a ControlNet in the checkpoints that carry it.

No torch, no heavy imports: the command line reads this table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Control:
    name: str
    """The spec key, checkpoint folder (``controlnet/<name>/``) and output suffix (``_control_<name>.mp4``)."""
    preprocessor: str
    """Module computing this control from the input video (``preprocessors.<name>``)."""
    model_dirs: tuple[str, ...] = ()
    """Weight folders its preprocessor loads, under ``--preprocessor_dir`` (none: OpenCV only)."""
    upstream: bool = True
    """cosmos-transfer2.5 has this control (False: this fork's addition; Transfer2.5 specs may still name it)."""
    preset_extra: str | None = None
    """Transfer2.5 spec extra choosing its preprocessor preset (checked against the module's ``PRESETS``)."""
    extras: tuple[str, ...] = ()
    """Other Transfer2.5 spec extras of its block."""

    @property
    def spec_extras(self) -> tuple[str, ...]:
        return ((self.preset_extra,) if self.preset_extra else ()) + self.extras


#: Every control, in cosmos-transfer1's order.
CONTROLS = (
    Control("vis", "preprocessors.vis", preset_extra="preset_blur_strength"),
    Control("edge", "preprocessors.edge", preset_extra="preset_edge_threshold"),
    Control("depth", "preprocessors.depth", model_dirs=("depth",)),
    Control("seg", "preprocessors.seg", model_dirs=("seg/detector", "seg/sam2"), extras=("control_prompt",)),
    Control("keypoint", "preprocessors.keypoint", model_dirs=("keypoint/detector", "keypoint/pose"), upstream=False),
)
BY_NAME = {c.name: c for c in CONTROLS}
#: Control modalities a checkpoint may carry a ControlNet for (cosmos-transfer1 spec keys).
MODALITIES = tuple(c.name for c in CONTROLS)
#: The controls cosmos-transfer2.5 has (its spec keys).
UPSTREAM_CONTROLS = tuple(c.name for c in CONTROLS if c.upstream)
#: Transfer2.5 spec extras and the control each belongs to.
SPEC_EXTRAS = {extra: c.name for c in CONTROLS for extra in c.spec_extras}
