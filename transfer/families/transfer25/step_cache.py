"""Step caching (``--step_cache``, off by default): skip whole DiT forwards of some denoising steps, lossy.

A skipped step runs neither the transformer nor any ControlNet, in any guidance branch: each branch's velocity is
predicted from the steps that were computed, and the guidance, the conditioning frames and the scheduler step run
as usual. So the cache sits at the branch level (``DiT.predict``), not on the transformer's blocks as diffusers'
hooks do (``diffusers.hooks``: FirstBlockCache, MagCache, TaylorSeer): for this model those would (1) still run every
ControlNet, which is 13% of a step per control at 720p; (2) add the ControlNet residuals that the transformer's forward
injects between its blocks a second time on a skipped step (the head block returns the cached residual of all later
blocks, which already holds them); and (3) under sequence parallelism, decide on each rank's own shard of the tokens,
so the ranks of a branch could take different paths and deadlock in the next all-to-all.

Methods (each decides from step indices and from the branch velocities every rank of a DiT group holds whole --
after the CFG swap and the sequence-parallel gather -- so all ranks of a group make the same decisions and no
collective is needed):

- ``taylorseer``: TaylorSeer's schedule and predictor (Liu et al. 2025; diffusers' ``TaylorSeerCacheConfig``
  ``cache_interval`` / ``disable_cache_before_step`` / ``max_order=1``) applied to whole branch velocities: the first
  ``warmup`` steps and then every ``interval``-th step are computed; a step in between is the first-order Taylor
  expansion, in the step index, of the last two computed velocities. The last step is always computed.
- ``adaptive``: a runtime-adaptive rule in the manner of MagCache / EasyCache: after each computed step the relative
  change of the guided branch velocities per step since the previous computed step, ``k``, is measured; a step is
  skipped (the last computed velocities reused) while the accumulated estimate of the error, ``k`` per skipped step,
  stays under ``threshold``, at most ``max_skips`` steps in a row. The first ``warmup`` steps and the last step are
  always computed.

Each chunk starts afresh (``new_cache``); its computed and skipped steps are logged per chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from transfer.config import StepCacheConfig


def new_cache(config: StepCacheConfig, num_steps: int) -> "StepCache | None":
    """The cache of one chunk's ``num_steps`` steps (None when off)."""
    return None if config.method == "off" else StepCache(config, num_steps)


@dataclass
class StepCache:
    config: StepCacheConfig
    num_steps: int
    computed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    _history: list[tuple[int, tuple[torch.Tensor, ...]]] = field(default_factory=list)
    _rate: float = float("inf")
    _error: float = 0.0
    _run: int = 0

    def skip(self, step: int) -> bool:
        """Whether ``step``'s forwards are skipped (decided before it; records the decision)."""
        c = self.config
        forced = step < c.warmup or step == self.num_steps - 1 or len(self._history) < (2 if c.method == "taylorseer" else 1)
        if forced:
            decision = False
        elif c.method == "taylorseer":
            decision = (step - c.warmup) % c.interval != 0
        else:
            decision = self._run < c.max_skips and self._error + self._rate < c.threshold
        if decision:
            self.skipped.append(step)
            self._run += 1
            self._error += self._rate
        else:
            self.computed.append(step)
            self._run, self._error = 0, 0.0
        return decision

    def record(self, step: int, velocities: tuple[torch.Tensor, ...]) -> None:
        """The branch velocities (positive[, negative]) a computed ``step`` produced."""
        if self._history:
            last_step, last = self._history[-1]
            change = sum(float((v.float() - u.float()).norm()) for v, u in zip(velocities, last))
            scale = sum(float(u.float().norm()) for u in last)
            self._rate = change / max(scale, 1e-12) / (step - last_step)
        self._history = [*self._history[-1:], (step, velocities)]

    def predict(self, step: int) -> tuple[torch.Tensor, ...]:
        """The branch velocities of a skipped ``step``."""
        (step1, v1) = self._history[-1]
        if self.config.method == "adaptive" or len(self._history) < 2:
            return v1
        step0, v0 = self._history[-2]
        t = (step - step1) / (step1 - step0)
        return tuple((b.float() + (b.float() - a.float()) * t).to(b.dtype) for a, b in zip(v0, v1))
