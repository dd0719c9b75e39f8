"""Command line: cosmos-transfer1's flags and cosmos-transfer2.5's (``-i/-o`` and the rest), one clear error line on bad
input. Every ``--long_flag`` is also accepted as ``--long-flag`` (``normalise_flags``), as upstream's tyro CLI does."""

from __future__ import annotations

import argparse
import os
import sys

from configs.models import PRESETS, checkpoint_presets
from transfer.config import (CHECKPOINT_DEFAULT_FLAGS, FORM_DEFAULTS, CheckpointChoice, GenerationSettings, GuardConfig,
                             InputConfig, OutputConfig, ParallelConfig, PlanConfig, PreprocessorOptions, RunConfig,
                             RuntimeConfig, StepCacheConfig)
from transfer.errors import TransferError
from transfer.flags import build_parser


def normalise_flags(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``--foo-bar[=v]`` -> ``--foo_bar[=v]`` for every flag the parser knows by its underscore name (upstream's tyro
    CLI takes both spellings). Values and unknown flags are left alone (argparse reports those)."""
    known = {o for a in parser._actions for o in a.option_strings}
    out = []
    for token in argv:
        if token.startswith("--") and "-" in token[2:].split("=", 1)[0]:
            name, eq, value = token.partition("=")
            underscored = "--" + name[2:].replace("-", "_")
            if underscored in known:
                token = underscored + eq + value
        out.append(token)
    return out


def checkpoint_defaults(args, error) -> dict:
    """The run's checkpoint's ``transfer_defaults.json`` (``--checkpoint_dir`` or a shipped preset's), less the flags
    given on the command line: ``{dest: value}``. ``error``: reports a malformed file (one line, exits)."""
    import json
    from pathlib import Path

    from configs.models import preset

    if args.checkpoint_dir:
        root = Path(args.checkpoint_dir)
    else:  # random weights come from configs: no shipped folder, no defaults
        random = getattr(args, "random_weights", False) or args.checkpoint_preset not in PRESETS  # Cosmos 3's: none
        root = None if random else preset(args.checkpoint_preset).shipped
    path = root / "transfer_defaults.json" if root is not None else None
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        error(f"cannot read the checkpoint's defaults {path}: {e}")
    if not isinstance(data, dict) or set(data) - set(CHECKPOINT_DEFAULT_FLAGS):
        error(f"{path}: expected an object with keys among {', '.join(CHECKPOINT_DEFAULT_FLAGS)}")
    return {dest: value for dest, value in data.items() if dest not in args.given}


def parse_args(argv: list[str] | None = None, prog: str | None = None, description: str | None = None
               ) -> argparse.Namespace:
    """Parse (both spellings), note which flags were given (``args.given``: a Transfer2.5 flag overrides the field in
    every sample) and fill the form's defaults and the checkpoint's own. ``prog`` / ``description``: another
    program taking transfer.py's flags (``python -m transfer.reference``)."""
    parser = build_parser()
    if prog:
        parser.prog, parser.description = prog, description or parser.description
    argv = normalise_flags(sys.argv[1:] if argv is None else list(argv), parser)
    args = parser.parse_args(argv)
    only_given = build_parser()
    for action in only_given._actions:
        action.default = argparse.SUPPRESS
    args.given = set(vars(only_given.parse_args(argv)))
    args.form = "transfer2.5" if args.input_files else "transfer1"
    for dest, value in FORM_DEFAULTS[args.form].items():
        if dest not in args.given:
            setattr(args, dest, value)
    def error(message: str):  # one line, no usage: these are not command-line mistakes
        parser.exit(2, f"{parser.prog}: error: {message}\n")

    plan_only = sorted(f"--{dest}" for dest in ("height", "width", "gpu_memory_gb") if dest in args.given)
    if plan_only and not args.plan:
        error(f"{'/'.join(plan_only)} {'acts' if len(plan_only) == 1 else 'act'} only with --plan (the generation size "
              "comes from the input video, or --resolution in the -i form)")
    if args.checkpoint_preset not in checkpoint_presets():
        error(f"$TRANSFER_CHECKPOINT_PRESET={args.checkpoint_preset!r} is not a checkpoint preset "
              f"({', '.join(checkpoint_presets())})")
    args.checkpoint_defaults = checkpoint_defaults(args, error)
    for dest, value in args.checkpoint_defaults.items():
        setattr(args, dest, value)
    if args.output_dir:
        args.video_save_folder = args.output_dir
    if args.num_gpus is None:  # upstream's torchrun commands have no such flag: the processes started
        args.num_gpus = int(os.environ.get("WORLD_SIZE", "1"))
    return args


def parse_config(argv: list[str] | None = None, prog: str | None = None, description: str | None = None) -> RunConfig:
    """``build_config(parse_args(...))``: a command line to the run's typed configuration."""
    return build_config(parse_args(argv, prog, description))


#: Transfer2.5-form flags refused in the transfer1 form.
ONLY_T25 = ("resolution", "keep_input_resolution", "show_input", "show_control_condition", "prompt_path", "video_path",
            "keep_going", "model", "output_dir")
#: cosmos-transfer1's per-model offload flags; each maps onto ``--offload stages`` (docs/performance.md).
UPSTREAM_OFFLOAD_FLAGS = ("offload_diffusion_transformer", "offload_text_encoder_model", "offload_tokenizer",
                          "offload_guardrail_models", "offload_prompt_upsampler")


def check_form_flags(args: argparse.Namespace) -> None:
    """Flags of the cosmos-transfer2.5 form that this fork refuses, each with one line saying why."""
    if args.benchmark:
        raise TransferError("--benchmark is not supported here: run benchmarks/*.py (side-by-side tables) or --trace")
    if args.profile:
        raise TransferError("--profile is not supported here: --trace FILE writes a Perfetto trace of every stage")
    if args.model == "edge/distilled":
        raise TransferError("--model edge/distilled needs the distilled Transfer2.5 edge checkpoint (4 steps, no "
                            "guidance), which has no diffusers conversion this fork can load")
    if args.input_files and (args.controlnet_specs or args.batch_input_path):
        raise TransferError("give -i/--input-files (Transfer2.5 form) or --controlnet_specs / --batch_input_path "
                            "(transfer1 form), not both")
    for dest in ("sigma_max", "image_context_path", "context_frame_index"):
        if dest in args.given:
            raise TransferError(f"--{dest} needs a model this fork does not have (docs/usage.md, Transfer2.5 flags)")
    if not args.input_files:
        only25 = sorted(args.given & set(ONLY_T25))
        if only25:
            raise TransferError(f"--{only25[0]} belongs to the Transfer2.5 form: give the specs with -i (docs/usage.md)")


def step_cache_config(args: argparse.Namespace) -> StepCacheConfig:
    """``--step_cache`` and its settings, checked (one error line for a bad value)."""
    if args.step_cache == "off":
        return StepCacheConfig()
    threshold, interval, warmup = args.step_cache_threshold, args.step_cache_interval, args.step_cache_warmup
    if not threshold > 0:
        raise TransferError(f"--step_cache_threshold must be above 0, got {threshold}")
    if interval < 2:
        raise TransferError(f"--step_cache_interval must be at least 2 (1 computes every step), got {interval}")
    if warmup < 2:
        raise TransferError(f"--step_cache_warmup must be at least 2 (a prediction needs computed steps), got {warmup}")
    return StepCacheConfig(args.step_cache, threshold, interval, warmup)


def build_config(args: argparse.Namespace) -> RunConfig:
    """The run's typed configuration from ``parse_args``' result: the one place flags become settings (library code
    sees no Namespace). Raises ``TransferError`` for a refused flag."""
    from pathlib import Path

    from transfer.spec25 import FLAG_FIELDS

    check_form_flags(args)
    sample_flags = {field: getattr(args, dest) for field, dest in FLAG_FIELDS.items() if dest in args.given}
    for field in ("prompt_path", "video_path"):
        if field in args.given:
            sample_flags[field] = str(Path(getattr(args, field)).resolve())
    own = args.checkpoint_defaults
    inputs = InputConfig(
        form=args.form, controlnet_specs=args.controlnet_specs, batch_input_path=args.batch_input_path,
        input_files=tuple(args.input_files or ()), video_save_name=args.video_save_name,
        defaults={**{k: getattr(args, k) for k in ("prompt", "negative_prompt", "input_video_path") if getattr(args, k)},
                  "seed": args.seed},
        sample_flags=sample_flags, sample_defaults={f: own[dest] for f, dest in FLAG_FIELDS.items() if dest in own},
        model=args.model, keep_going=args.keep_going, max_frames=args.max_frames, max_resolution=args.max_resolution)
    offload = "stages" if any(getattr(args, flag) for flag in UPSTREAM_OFFLOAD_FLAGS) else args.offload
    plan = (PlanConfig(args.gpu_memory_gb, args.plan_dtype, args.plan_device, args.height, args.width, args.frames)
            if args.plan else None)

    def plain(v):
        return sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v

    return RunConfig(
        generation=GenerationSettings(args.num_steps, args.guidance, args.num_frames_per_chunk,
                                      args.num_conditional_frames, args.chunk_conditioning),
        inputs=inputs,
        checkpoint=CheckpointChoice(args.checkpoint_dir, args.checkpoint_preset, args.random_weights, dict(own)),
        parallel=ParallelConfig(args.num_gpus, args.context_parallel_size, args.placement, args.cfgp_size,
                                args.vae_parallel_degree),
        runtime=RuntimeConfig(args.dtype, args.cpu_threads, args.compile, offload, args.attention_backend,
                              step_cache_config(args), args.trace),
        guard=GuardConfig("off" if args.disable_guardrail else args.guardrail, tuple(args.blocklist or ()),
                          tuple(args.allowlist or ()), args.guard_model, args.cosmos_guardrail_dir,
                          args.face_pixelation == "on", args.face_min_size, args.face_confidence),
        preprocess=PreprocessorOptions(args.blur_strength, args.canny_threshold,
                                       None if args.preprocessor_dir is None else str(args.preprocessor_dir)),
        output=OutputConfig(Path(args.video_save_folder), args.form, args.fps, args.save_raw, args.overwrite),
        plan=plan,
        record={k: plain(v) for k, v in sorted(vars(args).items()) if k != "given"})


def main(argv: list[str] | None = None) -> int:
    from transfer.errors import STOPPED_CLEANLY, Terminated, TransferError, raise_on_stop_signals, report_stop

    with raise_on_stop_signals():  # from the first line: a stop while importing or loading is one line too
        try:
            return _main(argv)
        except TransferError as e:
            if os.environ.get("RANK", "0") == "0":  # under torchrun every rank refuses the same flags: one says so
                print(f"transfer.py: error: {e}", file=sys.stderr)
            return 2
        except Terminated as stop:
            report_stop(f"transfer.py: stopped by {stop}: {STOPPED_CLEANLY}")
            return stop.exit_code


def _main(argv: list[str] | None) -> int:
    config = parse_config(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models load from local directories only
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level=os.environ.get("TRANSFER_LOG_LEVEL", "INFO"),
               format="<green>{time:HH:mm:ss}</green> | <level>{level: <7}</level> | {message}")
    if config.plan is not None:
        from transfer.families import plan

        report = plan(config)
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank plans; one prints
            print(report)
        return 0
    from transfer.runner import run

    return run(config).status
