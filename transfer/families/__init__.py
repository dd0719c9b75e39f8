"""The model families, decided once: a checkpoint choice gives its family, and every place that runs differently for
Transfer2.5 and Cosmos 3 asks the family instead of testing a type.

* ``family_of(choice)``: the registry. A Cosmos 3 folder (its ``transformer/config.json`` class) or preset is
  ``COSMOS3``; anything else (Transfer2.5 folders, the demo and tiny presets, ``--random_weights`` presets) is
  ``TRANSFER25``; ``plan_job`` asks it once and keeps the answer (``Job.family``).
* A ``Family`` reads its configs (``info``), says its limits, checks a request and the runtime flags, loads the
  single process's pipeline, picks its rank program under torchrun and writes its ``--plan`` report.

Each family's model code lives in its folder (``transfer/families/transfer25/``, ``transfer/families/cosmos3/``);
this module is the one switch between them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str

    def owns(self, choice) -> bool:
        raise NotImplementedError

    def info(self, choice):
        """The checkpoint's configs (no weights loaded)."""
        raise NotImplementedError

    def limits(self, info):
        """``transfer.prepare.ModelLimits``: frame counts and sizes the model takes."""
        raise NotImplementedError

    def check_run(self, info, config, world: int) -> None:
        """Refuse, in one line, flags this family does not apply (before anything loads)."""
        raise NotImplementedError

    def check_request(self, info, request, settings) -> None:
        """Refuse, in one line, what this family cannot do with one request."""
        raise NotImplementedError

    def load(self, job, modalities: list[str], device, dtype):
        """The single process's pipeline (``generate(prepared, ...)``) for ``job`` and its controls."""
        raise NotImplementedError

    def plan(self, config) -> str:
        """The ``--plan`` report of ``config.checkpoint``."""
        raise NotImplementedError

    def rank_program(self, job, config, world: int, rank: int, cuda: bool):
        """Under torchrun: None to run on the stage processes' ``RankLoop``, or a function running this family's own
        rank program (returning ``leave``'s arguments). Validates its layout now (a ``TransferError`` is refused on
        every rank alike)."""
        return None


class Transfer25(Family):
    def owns(self, choice) -> bool:
        return True  # the default: whatever is not another family's

    def info(self, choice):
        from transfer.checkpoint import checkpoint_info

        return checkpoint_info(choice)

    def limits(self, info):
        from transfer.prepare import ModelLimits

        return ModelLimits.from_info(info)

    def check_run(self, info, config, world: int) -> None:
        from transfer.errors import TransferError

        if config.parallel.pass_degree is not None:
            raise TransferError("--cfgp-size deals Cosmos 3's transformer passes: this checkpoint is Transfer2.5 (its "
                                "CFG branches are placed by the preset, docs/parallelism.md)")

    def check_request(self, info, request, settings) -> None:
        from transfer.checkpoint import require_modalities
        from transfer.errors import TransferError

        own = [*request.cosmos3, *(["wsm"] if "wsm" in request.controls else [])]  # Cosmos 3's fields and hint
        if own:
            raise TransferError(f"{request.where}: {own[0]!r} is Cosmos 3's: this checkpoint is Transfer2.5 (give a "
                                "Cosmos 3 checkpoint, e.g. --checkpoint_preset cosmos3-tiny)")
        require_modalities(info, request.controls, request.source)

    def load(self, job, modalities: list[str], device, dtype):
        from transfer.families.transfer25.loading import load_stages
        from transfer.families.transfer25.pipeline import TransferPipeline

        stages, job.residency = load_stages(job.info, ["text", "vae", "dit"], modalities, device, dtype, job.runtime)
        return TransferPipeline(stages["text"], stages["vae"], stages["dit"], job.limits, job.settings)

    def plan(self, config) -> str:
        from transfer.plan import run_plan

        return run_plan(config)


class Cosmos3(Family):
    def owns(self, choice) -> bool:
        from configs.cosmos3 import COSMOS3_PRESETS
        from transfer.checkpoint import resolve_checkpoint
        from transfer.families.cosmos3.checkpoint import is_cosmos3

        if choice.dir:
            return is_cosmos3(resolve_checkpoint(choice))
        return choice.preset in COSMOS3_PRESETS

    def info(self, choice):
        from transfer.checkpoint import checkpoint_info, resolve_checkpoint
        from transfer.families.cosmos3.checkpoint import cosmos3_preset_info, inspect_cosmos3

        if choice.random_weights:
            if choice.dir:
                checkpoint_info(choice)  # its one-line refusal of --random_weights with --checkpoint_dir
            return cosmos3_preset_info(choice.preset)
        return inspect_cosmos3(resolve_checkpoint(choice))

    def limits(self, info):
        return info.limits()

    def check_run(self, info, config, world: int) -> None:
        from transfer.errors import TransferError

        info.check_runtime(config.runtime)
        passes = config.parallel.pass_degree
        if passes is not None and not 1 <= passes <= min(3, world):
            raise TransferError(f"--cfgp-size {passes} must be between 1 and {min(3, world)} (at most 3 passes a step, "
                                f"{world} process(es) started)")

    def check_request(self, info, request, settings) -> None:
        info.check_request(request, settings)

    def load(self, job, modalities: list[str], device, dtype):
        from transfer.families.cosmos3.pipeline import Cosmos3Pipeline, load_cosmos3

        return Cosmos3Pipeline(load_cosmos3(job.info, device, dtype), job.settings, job.config.output.fps)

    def rank_program(self, job, config, world: int, rank: int, cuda: bool):
        from transfer.families.cosmos3.ranks import layout_for, run_cosmos3

        layout = layout_for(config.parallel, world, job.info.transformer["num_attention_heads"], job.latent_rows, cuda)
        return lambda: run_cosmos3(job, layout, rank)  # lockstep ranks (not yet the RankLoop's roles)

    def plan(self, config) -> str:
        from configs.cosmos3 import COSMOS3_PRESETS
        from transfer.checkpoint import resolve_checkpoint
        from transfer.families.cosmos3.checkpoint import cosmos3_preset_info, inspect_cosmos3
        from transfer.families.cosmos3.plan import cosmos3_plan_report

        choice = config.checkpoint
        if not choice.dir and not COSMOS3_PRESETS[choice.preset]().embedded:  # a real size: configs only
            return cosmos3_plan_report(config, cosmos3_preset_info(choice.preset), f"preset {choice.preset}")
        root = resolve_checkpoint(choice)
        return cosmos3_plan_report(config, inspect_cosmos3(root), str(root))


TRANSFER25, COSMOS3 = Transfer25("transfer2.5"), Cosmos3("cosmos3")
#: Checked in order: the first that owns a choice is its family (Transfer2.5 owns the rest).
FAMILIES = (COSMOS3, TRANSFER25)


def family_of(choice) -> Family:
    """The family of a checkpoint choice (``transfer.config.CheckpointChoice``)."""
    return next(f for f in FAMILIES if f.owns(choice))


def plan(config) -> str:
    """The ``--plan`` report, either family."""
    from transfer.errors import TransferError

    if config.plan.gpu_memory_gb <= 0:
        raise TransferError(f"--gpu_memory_gb must be positive, got {config.plan.gpu_memory_gb}")
    return family_of(config.checkpoint).plan(config)
