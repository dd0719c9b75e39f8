"""Every flag of ``transfer.py``, its help and its default (defaults from ``transfer.config``): both command forms,
cosmos-transfer1's and cosmos-transfer2.5's, in one ``argparse`` parser. ``transfer.cli`` parses with it and builds the
run's configuration. No torch here: ``--help`` answers at once."""

from __future__ import annotations

import argparse
import os

from configs.controls import MODALITIES
from configs.models import checkpoint_presets
from transfer.config import DEFAULT_SEED, FORM_DEFAULTS, STEP_CACHE_METHODS, GenerationSettings

#: ``--dtype`` (``transfer.device.dtype_for``).
DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")
#: diffusers' attention dispatcher backends that run from installed packages (its ``*_hub`` backends download kernels
#: at run time, which this tool never does); ``auto``: ``transfer.acceleration.DEFAULT_ATTENTION``.
ATTENTION_CHOICES = ("auto", "native", "_native_cudnn", "_native_flash", "_native_efficient", "_native_math", "flex",
                     "flash", "_flash_3", "sage", "xformers")

DESCRIPTION = """Cosmos-Transfer control-to-video generation (pipeline-parallel fork).

Turns control videos (vis, edge, depth, seg, keypoint) plus a prompt into a new video.
With no --checkpoint_dir it runs the shipped demo checkpoint (a small model trained on a
world of colored shapes at 64 x 64, edge control only; runs in seconds on a CPU) or another
--checkpoint_preset (tiny: random weights, every control); point --checkpoint_dir at a
diffusers-layout directory (text_encoder/ tokenizer/ transformer/ vae/ scheduler/
controlnet/<modality>/) for real weights. A checkpoint's transfer_defaults.json sets its own
defaults for --num_steps, --guidance, --num_frames_per_chunk and --resolution.

Two command forms, one engine (docs/usage.md, "Coming from Transfer2.5 / transfer1"):
  cosmos-transfer1:   transfer.py --controlnet_specs SPEC.json [--batch_input_path B.jsonl] --video_save_folder DIR
  cosmos-transfer2.5: transfer.py -i SPEC.json [MORE.jsonl ...] -o DIR   (outputs NAME.mp4/.json/.txt,
                      NAME_control_KEY.mp4, config.yaml, console.log, as upstream writes them)
Every flag takes dashes or underscores (--num-steps = --num_steps)."""

#: The default ``--checkpoint_preset``; ``$TRANSFER_CHECKPOINT_PRESET`` changes it (the test suite runs ``tiny``).
DEFAULT_PRESET = "demo"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="transfer.py", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    t25 = p.add_argument_group("cosmos-transfer2.5 form (examples/inference.py's flags)")
    t25.add_argument("-i", "--input_files", nargs="+", metavar="FILE",
                     help="Transfer2.5 spec files: .json (one sample) or .jsonl (one a line), run in turn on one model "
                     "load; each sample's fields are overridden by the flags given here")
    t25.add_argument("-o", "--output_dir", metavar="DIR", help="output folder for the -i form (same as --video_save_folder)")
    t25.add_argument("--model", choices=(*MODALITIES, "edge/distilled"),
                     help="limit the run to this control (a sample naming another fails); edge/distilled is refused: no "
                     "diffusers conversion of the distilled checkpoint exists (default: the controls each sample names)")
    t25.add_argument("--checkpoint_path", dest="checkpoint_dir", metavar="DIR",
                     help="same as --checkpoint_dir (a diffusers-layout folder, not upstream's .pt)")
    t25.add_argument("--keep_going", dest="keep_going", action="store_true", default=None,
                     help="-i form: a sample that fails is recorded in failures.jsonl and the others run (default)")
    t25.add_argument("--no_keep_going", dest="keep_going", action="store_false",
                     help="-i form: the first sample that fails ends the run")
    t25.add_argument("--resolution", help="-i form: generation height in pixels, e.g. 720 or 480 (default: 720, or "
                     "the checkpoint's own: 64 for demo; a smaller model generates at its largest size)")
    t25.add_argument("--keep_input_resolution", dest="keep_input_resolution", action="store_true", default=None,
                     help="-i form: write the output at the input's size (default)")
    t25.add_argument("--no_keep_input_resolution", dest="keep_input_resolution", action="store_false",
                     help="-i form: write the output at the generation size")
    t25.add_argument("--show_input", action="store_true", default=None, help="-i form: input video left of the output")
    t25.add_argument("--show_control_condition", action="store_true", default=None,
                     help="-i form: the control videos left of the output")
    t25.add_argument("--prompt_path", help="-i form: read every sample's prompt from this file")
    t25.add_argument("--video_path", help="-i form: every sample's input video")
    for flag in ("sigma_max", "context_frame_index", "image_context_path"):
        t25.add_argument(f"--{flag}", help="refused: needs a model this fork does not have (docs/usage.md)")
    for flag, instead in (("benchmark", "benchmarks/*.py and --trace"), ("profile", "--trace")):
        t25.add_argument(f"--{flag}", action="store_true", help=f"refused: use {instead}")

    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--controlnet_specs", help="spec JSON (cosmos-transfer1 format): prompt, input_video_path, "
                    "and per modality control_weight / input_control")
    io.add_argument("--batch_input_path", help="JSONL file, one spec per line (optional 'name', 'seed'); "
                    "lines are merged over --controlnet_specs when both are given")
    io.add_argument("--prompt", help="prompt, used when the spec has none")
    io.add_argument("--negative_prompt", help="negative prompt, used when the spec has none (default: upstream's)")
    io.add_argument("--input_video_path", help="input video, used when the spec has none")
    io.add_argument("--video_save_folder", default="outputs/", help="output folder (default: outputs/)")
    io.add_argument("--video_save_name", default="output",
                    help="output file stem for a single spec: NAME.mp4 and NAME.txt (default: output)")
    io.add_argument("--save_raw", action="store_true",
                    help="also write NAME.npz with uint8 'frames' (T,H,W,3) and float32 'latents' (chunks,C,T,h,w): C is "
                    "16 for Transfer2.5, 48 for Cosmos 3")
    io.add_argument("--overwrite", action="store_true",
                    help="replace outputs an earlier run made with other settings (without it such a request is "
                    "refused); complete outputs with the same settings are skipped either way (docs/batch.md)")
    io.add_argument("--fps", type=float, default=24,
                    help="output frame rate (default: 24); Cosmos 3 also reads it in its prompt (the clip's duration), "
                    "so it changes Cosmos 3's frames too")
    io.add_argument("--max_frames", type=int, default=10_000,
                    help="refuse input or control videos longer than this, before decoding them (default: 10000)")
    io.add_argument("--max_resolution", type=int, default=4096,
                    help="refuse videos wider or taller than this many pixels, before decoding them (default: 4096)")

    model = p.add_argument_group("model")
    model.add_argument("--checkpoint_dir", help="diffusers-layout checkpoint directory "
                       "(default: the --checkpoint_preset's)")
    model.add_argument("--random_weights", action="store_true",
                       help="build the --checkpoint_preset's models (e.g. transfer2.5-2b) from their configs with random "
                       "weights, directly on each rank's device in the run dtype, and run the whole pipeline: real-size "
                       "time and memory without a download; outputs are marked as made with random weights")
    model.add_argument("--checkpoint_preset", default=os.environ.get("TRANSFER_CHECKPOINT_PRESET", DEFAULT_PRESET),
                       choices=checkpoint_presets(),
                       help="the checkpoint without --checkpoint_dir (default: demo, or $TRANSFER_CHECKPOINT_PRESET): "
                       "demo = the shipped trained demo model (edge control, 64 x 64 shapes world); tiny, tiny-4head, "
                       "tiny-reason = random weights built on first use (every control; noise-like output); "
                       "transfer2.5-2b and transfer2.5-2b-t5-11b are real-size configs without weights, for --plan and "
                       "--random_weights; cosmos3-tiny = a random-weight Cosmos 3 (every hint), cosmos3-nano = Cosmos3-Nano's "
                       "configs (docs/cosmos3.md)")

    gen = p.add_argument_group("generation")
    t25d, g = FORM_DEFAULTS["transfer2.5"], GenerationSettings
    gen.add_argument("--num_steps", type=int, default=g.num_steps,
                     help=f"denoising steps per chunk (default: {g.num_steps}; {t25d['num_steps']} in the -i form; the "
                     "checkpoint's own if it sets one)")
    gen.add_argument("--guidance", type=float, default=g.guidance,
                     help=f"classifier-free guidance scale (default: {g.guidance}, or the checkpoint's own)")
    gen.add_argument("--seed", type=int, default=DEFAULT_SEED,
                     help=f"seed; each request has its own generator (default: {DEFAULT_SEED}; {t25d['seed']} in the -i "
                     "form)")
    gen.add_argument("--num_frames_per_chunk", "--num_video_frames_per_chunk", type=int, default=g.num_frames_per_chunk,
                     help=f"frames per chunk, 1 + (VAE temporal factor) x k (default: {g.num_frames_per_chunk}, or the "
                     "checkpoint's own)")
    gen.add_argument("--num_conditional_frames", type=int, default=g.num_conditional_frames,
                     help=f"frames of overlap conditioning each later chunk (default: {g.num_conditional_frames})")
    gen.add_argument("--chunk_conditioning", choices=("roundtrip", "latent"), default=g.chunk_conditioning,
                     help="how a chunk is conditioned on the previous one: roundtrip = decode it and re-encode its last "
                     "frames (upstream); latent = reuse its final latents, no VAE between chunks; needs "
                     "--num_conditional_frames 0 or 1 + 4k (docs/long_video.md) (default: roundtrip)")

    run = p.add_argument_group("runtime")
    run.add_argument("--num_gpus", type=int,
                     help="number of processes (torchrun --nproc_per_node); must equal WORLD_SIZE (default: WORLD_SIZE, "
                     "1 without torchrun; with --plan, the GPUs to plan for). Stages are placed by the preset for that "
                     "many ranks (docs/parallelism.md)")
    run.add_argument("--placement", help="JSON file overriding the stage placement: "
                     '{"coordinator": 0, "text": 1, "vae": 2, "dit_groups": [[3]]} (Cosmos 3: one DiT group, its "cfg" '
                     "counting pass branches, docs/cosmos3.md)")
    run.add_argument("--cfgp_size", "--cfgp-size", type=int, metavar="N",
                     help="Cosmos 3 (NVIDIA's cosmos-framework spelling): branches of the DiT group that deal each "
                     "step's transformer passes (cond, cond without hints, uncond) among them, 1 to 3; with --cp-size it must "
                     "fill WORLD_SIZE - 1 or WORLD_SIZE ranks (default: chosen with --cp-size and printed, "
                     "docs/cosmos3.md)")
    run.add_argument("--context_parallel_size", "--context-parallel-size", "--cp_size", "--cp-size", type=int,
                     metavar="N",
                     help="split each DiT and ControlNet forward of a guidance branch over N ranks along the token "
                     "sequence (Ulysses; N must split the DiT's attention heads and fit in a node). Upstream "
                     "Transfer2.5 defaults it to WORLD_SIZE; here the default chooses the layout that ends the run "
                     "soonest (one video: one DiT group over every rank, CFG branches on separate ranks) and prints it "
                     "(docs/parallelism.md; Cosmos 3: each transformer pass over N ranks, docs/cosmos3.md)")
    run.add_argument("--vae_parallel_degree", "--vae-parallel-degree", type=int, metavar="N",
                     help="split each VAE encode and decode of a chunk over N ranks by rows (exact: halos exchanged, "
                     "the middle attention over the whole frame); the group is the first N ranks of the first DiT "
                     "group, led by its leader, and runs between denoising (Cosmos 3: rank 0 and the ranks after it) "
                     "(default: on GPUs, every rank of the DiT group when the VAE would otherwise sit beside one of its "
                     "shards; else 1; docs/parallelism.md)")
    run.add_argument("--compile", choices=("none", "torch", "tensorrt"), default="none",
                     help="compile the DiT, ControlNets and VAE of the stages a process holds: torch = torch.compile "
                     "(CPU or CUDA); tensorrt = torch-tensorrt engines, cached on disk (pip install '.[tensorrt]', "
                     "CUDA only) (default: none) (docs/performance.md). Transfer2.5 only: refused for Cosmos 3")
    run.add_argument("--attention_backend", choices=ATTENTION_CHOICES, default="auto",
                     help="attention kernel of the DiT and ControlNets, by diffusers' dispatcher name: native = torch "
                     "SDPA's own choice, _native_cudnn/_native_flash/_native_efficient/_native_math force one of "
                     "torch's, flash/_flash_3/sage/xformers need their packages; auto = the fastest measured on this "
                     "GPU model (docs/performance.md), native on CPU (default: auto). Transfer2.5 only: refused for "
                     "Cosmos 3")
    run.add_argument("--step_cache", choices=STEP_CACHE_METHODS, default="off",
                     help="skip the DiT and ControlNet forwards of some denoising steps (lossy; default: off): taylorseer "
                     "= compute every --step_cache_interval-th step after the warm-up, predict the others by a "
                     "first-order Taylor expansion of the computed velocities; adaptive = reuse the last computed "
                     "velocities while the accumulated relative change, measured from the computed steps, stays under "
                     "--step_cache_threshold (docs/performance.md). Transfer2.5 only: refused for Cosmos 3")
    run.add_argument("--step_cache_threshold", type=float, default=0.03,
                     help="adaptive: accumulated relative velocity change allowed across skipped steps (default: 0.03)")
    run.add_argument("--step_cache_interval", type=int, default=2,
                     help="taylorseer: compute every N-th step after the warm-up (default: 2)")
    run.add_argument("--step_cache_warmup", type=int, default=2,
                     help="steps always computed at the start of each chunk (default: 2; the last step always is)")
    run.add_argument("--offload", choices=("none", "stages"), default="none",
                     help="stages: where one process holds several stages, only the one at work keeps its weights on the "
                     "device (the others wait in CPU memory; on a CPU run, in a temp file); a memory report ends the run "
                     "(default: none). Transfer2.5 only: refused for Cosmos 3")
    for flag in ("diffusion_transformer", "text_encoder_model", "tokenizer", "guardrail_models", "prompt_upsampler"):
        run.add_argument(f"--offload_{flag}", action="store_true", help="upstream's flag: same as --offload stages")
    run.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                     help="weights and activations: auto = bf16 on CUDA, fp32 on CPU (default: auto); bf16 runs on CPU too")
    run.add_argument("--cpu_threads", type=int, default=1,
                     help="torch threads of each process that computes on the CPU (default: 1, in one process and "
                          "under torchrun alike, so the bytes written do not depend on the machine's cores or the "
                          "process count; another count rounds float sums differently and is recorded in the manifest)")
    run.add_argument("--trace", help="write a Chrome/Perfetto trace of every stage's busy intervals (multi-process runs)")

    pre = p.add_argument_group("computed controls (docs/preprocessors.md): a control without input_control is "
                               "computed from the input video")
    pre.add_argument("--blur_strength", default="medium",
                     choices=("none", "very_low", "low", "medium", "high", "very_high"),
                     help="vis control: bilateral blur + down/up resize preset (default: medium)")
    pre.add_argument("--canny_threshold", default="medium", choices=("very_low", "low", "medium", "high", "very_high"),
                     help="edge control: Canny threshold preset (default: medium)")
    pre.add_argument("--preprocessor_dir", metavar="DIR",
                     help="weights for the depth, seg and keypoint preprocessors: depth/, seg/detector/, seg/sam2/, "
                     "keypoint/detector/, keypoint/pose/ (default: CHECKPOINT/preprocessors when it exists)")

    guard = p.add_argument_group("guardrails (docs/guardrails.md)")
    guard.add_argument("--guardrail", choices=("on", "async", "off"), default="on",
                       help="on: check each prompt before generating it and each video before writing it; async: the "
                       "same checks beside generation (text while the models start, video of request j while j+1 "
                       "generates); off: no checks. A blocked request writes NAME.blocked.json, no video (default: on)")
    guard.add_argument("--disable_guardrail", "--disable_guardrails", action="store_true",
                       help="same as --guardrail off (upstream's flag, both spellings)")
    guard.add_argument("--blocklist", action="append", metavar="FILE",
                       help="extra blocked words or phrases, one per line (# comments); repeatable")
    guard.add_argument("--allowlist", action="append", metavar="FILE",
                       help="phrases never blocked (known false positives), one per line; repeatable")
    guard.add_argument("--guard_model", metavar="DIR",
                       help="local transformers text classifier or guard LLM (Llama Guard, Qwen3Guard) checked after "
                       "the blocklist; loaded on first use (default: none)")
    guard.add_argument("--cosmos_guardrail_dir", metavar="DIR",
                       help="local nvidia/Cosmos-Guardrail1 weights: adds the cosmos_guardrail package's text and video "
                       "safety checker (package must be installed)")
    guard.add_argument("--face_pixelation", choices=("on", "off"), default="on",
                       help="pixelate faces found by the YuNet face detector (OpenCV FaceDetectorYN; default: on)")
    guard.add_argument("--face_min_size", type=int, default=20, help="smallest face, in pixels, to pixelate (default: 20)")
    guard.add_argument("--face_confidence", type=float, default=0.9,
                       help="detector score (0-1) a face needs; higher = fewer false positives (default: 0.9)")

    plan = p.add_argument_group("memory planning")
    plan.add_argument("--plan", action="store_true",
                      help="print each rank's peak memory (weights + activations of its stages at --height x --width, "
                      "--frames per chunk) for --num_gpus / --placement, which preset placements fit 24, 48 and 80 GB, "
                      "and exit; models are built from configs only, on the meta device (weights) and on fake tensors "
                      "(activations), so the configs-only presets transfer2.5-2b and transfer2.5-2b-t5-11b work; needs "
                      "no torchrun and no inputs (a spec narrows the ControlNets); about a minute at 720p")
    plan.add_argument("--gpu_memory_gb", type=float, default=80.0, help="GPU memory to plan against (default: 80)")
    plan.add_argument("--plan_dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                      help="weight and activation dtype to plan with (default: bf16, what CUDA runs use)")
    plan.add_argument("--plan_device", choices=("cuda", "cpu"), default="cuda",
                      help="device type to plan for; cpu adds the im2col workspace of CPU's fp32 3-D convolutions "
                      "(default: cuda)")
    plan.add_argument("--height", type=int, default=704, help="--plan: video height in pixels (default: 704)")
    plan.add_argument("--width", type=int, default=1280, help="--plan: video width in pixels (default: 1280)")
    plan.add_argument("--frames", type=int, help="--plan: frames per chunk (default: --num_frames_per_chunk, 93)")
    return p
