"""One DiT denoising step at real size: each attention backend, compile on and off, FLOPs and the share of peak.

    python benchmarks/dit_step.py                  # Transfer2.5-2B, random weights, 93x704x1280, bf16, on GPU 0
    python benchmarks/dit_step.py --compile        # also --compile torch (regional) with the fastest backend
    python benchmarks/dit_step.py --small          # the same code on CPU: the small preset at 9x64x96

The DiT stage is the product's (``transfer.checkpoint.load_stage`` with random weights: transformer plus the edge and
vis ControlNets) and a step is ``transfer.memory.dit_step``: the chunk's state, then one guided velocity (every
ControlNet, then the transformer, per guidance branch), on seeded random inputs. For each attention backend of
``--backends`` that this machine can run (``transfer.acceleration.set_attention_backend``: the product's
``--attention_backend``), one warm-up step, then ``--repeats`` timed steps without CFG, one control (edge); the latent
error of the step's velocity against ``native`` (mean and max of |difference| over mean |native|). Then, with the
fastest backend: the step with CFG (two branches) with edge, and with edge + vis (time and peak memory above what was
allocated before it: ``transfer.memory.measured_peak``), and with ``--compile`` the same after ``--compile torch``
(first call, compile included, and a timed call).

FLOPs of a step are counted, not estimated: the same step runs once on fake tensors (no storage, no arithmetic) under
``torch.utils.flop_counter.FlopCounterMode``, which counts every matrix product and attention from its shapes
(attention as 4 x batch x heads x queries x keys x head dim); the achieved rate is that over the measured time, and
its share of ``--peak_tflops`` (H200/H100 SXM dense bf16: about 790 TFLOP/s measured here with 8192^3 products;
989 on the data sheet). The projected 35-step chunk is 35 CFG steps plus ``--vae_seconds`` (the VAE calls of a chunk
with one control, from benchmarks/real_size.py) next to upstream's published one-GPU times, and the same with
``--step_cache taylorseer``, whose schedule is fixed by the step index (the ``adaptive`` cache's depends on the
weights: random weights say nothing of it; benchmarks/quality.py measures both on the trained demo).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs.models import preset  # noqa: E402
from transfer.acceleration import CPU_ATTENTION, compile_stage, set_attention_backend  # noqa: E402
from transfer.checkpoint import info_from_preset, load_stage  # noqa: E402
from transfer.errors import TransferError  # noqa: E402
from transfer.device import dtype_for  # noqa: E402
from transfer.memory import ChunkSize, call_inputs, dit_step, measured_peak  # noqa: E402

#: Upstream's published one-GPU times of one Transfer2.5-2B edge chunk, 720p, 93 frames, 35 steps (docs/performance.md).
UPSTREAM_ONE_GPU = {"H200 NVL": 374.4, "H100 NVL": 502.6, "B200": 179.7}
#: Backends tried by default: torch's own kernels and the packages diffusers can use when installed. ``_native_math``
#: is left out on CUDA at real size: it materialises the score matrix (84480^2 per head: hundreds of GB).
BACKENDS = ("native", "_native_cudnn", "_native_flash", "_native_efficient", "flash", "_flash_3", "sage", "xformers")


def step_flops(info, request: ChunkSize, dtype: torch.dtype, guidance: float) -> int:
    """FLOPs of one ``dit_step`` at ``request``'s size, counted on fake tensors (shapes only) on the CPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    cpu = torch.device("cpu")
    with FakeTensorMode(allow_non_fake_inputs=True):
        inputs = call_inputs(info, request, dtype)
        dit = load_stage(info, "dit", request.modalities, cpu, dtype)
        mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention}
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            dit_step(dit, inputs, guidance)
    return counter.get_total_flops()


def random_inputs(info, request: ChunkSize, dtype: torch.dtype) -> dict:
    """``call_inputs`` filled with seeded random values (zeros would make every backend agree trivially)."""
    inputs = call_inputs(info, request, dtype)
    generator = torch.Generator().manual_seed(0)
    for key in ("noise", "embeds"):
        inputs[key] = torch.randn(inputs[key].shape, generator=generator).to(inputs[key].dtype)
    inputs["controls"] = {m: torch.randn(c.shape, generator=generator).to(c.dtype) for m, c in inputs["controls"].items()}
    return inputs


def timed_step(device: torch.device, dit, inputs: dict, guidance: float, repeats: int, warmup: int = 1):
    """(mean seconds over ``repeats`` steps after ``warmup`` untimed ones, the last velocity)."""
    out = None
    for _ in range(warmup):
        out = dit_step(dit, inputs, guidance)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        out = dit_step(dit, inputs, guidance)
    sync(device)
    return (time.perf_counter() - start) / max(repeats, 1), out


def errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(mean, max) of |out - ref| over the mean |ref|."""
    diff, scale = (out.float() - ref.float()).abs(), ref.float().abs().mean().item()
    return diff.mean().item() / scale, diff.max().item() / scale


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="transfer2.5-2b")
    p.add_argument("--height", type=int, default=704)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--frames", type=int, default=93)
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="also time --compile torch with the fastest backend")
    p.add_argument("--steps", type=int, default=35, help="steps of the projected chunk (default: 35)")
    p.add_argument("--vae_seconds", type=float, default=11.5,
                   help="VAE seconds of one edge chunk (encode control + decode + re-encode; default: 11.5, measured "
                   "on an H200 by real_size.py: 3.47 + 5.12 + 2.91)")
    p.add_argument("--peak_tflops", type=float, default=790.0)
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    p.add_argument("--small", action="store_true", help="CPU check: the small preset at 9x64x96")
    args = p.parse_args()
    if args.small:
        args.preset, args.height, args.width, args.frames = "transfer2.5-2b-small", 64, 96, 9
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    dtype = dtype_for(device, args.dtype)
    info = info_from_preset(preset(args.preset))
    edge, both = ChunkSize(args.height, args.width, args.frames, ("edge",)), ChunkSize(args.height, args.width, args.frames, ("edge", "vis"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.preset}, random weights, {name} ({str(dtype).removeprefix('torch.')}), chunk "
          f"{args.frames}x{args.height}x{args.width}\n")

    start = time.perf_counter()
    flops = {(c, g): step_flops(info, r, dtype, g) for c, r in (("edge", edge), ("edge+vis", both)) for g in (1.0, 3.0)}
    print(f"FLOPs of one step, counted on fake tensors in {time.perf_counter() - start:.0f} s: "
          + ", ".join(f"{c} {'CFG' if g > 1 else 'no CFG'} {f / 1e12:.4g} TFLOP" for (c, g), f in flops.items()) + "\n")

    dit = load_stage(info, "dit", both.modalities, device, dtype)
    inputs = random_inputs(info, both, dtype)
    one = {**inputs, "controls": {"edge": inputs["controls"]["edge"]}}
    rows, ref, results = [], None, {}
    print("| attention backend | step, no CFG, edge (s) | TFLOP/s | % of peak | latent error vs native: mean | max |")
    print("|---|---:|---:|---:|---:|---:|")
    backends = args.backends.split(",") + (["_native_math"] if device.type == "cpu" else [])
    for backend in dict.fromkeys(backends):
        if device.type == "cpu" and backend not in CPU_ATTENTION:
            continue
        try:
            from transfer.acceleration import check_attention_backend

            check_attention_backend(backend, device.type == "cuda")
            set_attention_backend("dit", dit, backend)
            seconds, out = timed_step(device, dit, one, 1.0, args.repeats)
        except (TransferError, RuntimeError, ValueError) as e:
            print(f"| {backend} | not run: {' '.join(str(e).split())[:120]} | | | | |")
            continue
        out = out.float().cpu()
        ref = out if ref is None else ref
        mean_err, max_err = errors(out, ref)
        rate = flops[("edge", 1.0)] / seconds / 1e12
        results[backend] = seconds
        print(f"| {backend} | {seconds:.3f} | {rate:.0f} | {100 * rate / args.peak_tflops:.1f} | {mean_err:.2e} | {max_err:.2e} |",
              flush=True)
    if not results:
        return
    best = min(results, key=results.get)
    set_attention_backend("dit", dit, best)
    print(f"\nfastest: {best}\n")
    print("| step (fastest backend) | s | TFLOP/s | % of peak | peak MB above the weights |")
    print("|---|---:|---:|---:|---:|")
    cfg = {}
    for label, x, key in (("CFG, edge", one, ("edge", 3.0)), ("CFG, edge + vis", inputs, ("edge+vis", 3.0))):
        seconds, eager_out = timed_step(device, dit, x, 3.0, args.repeats)
        cfg[label] = (seconds, eager_out.float().cpu())
        rate = flops[key] / seconds / 1e12
        peak = measured_peak(device, lambda: dit_step(dit, x, 3.0))[0] / 1e6
        print(f"| {label} | {seconds:.3f} | {rate:.0f} | {100 * rate / args.peak_tflops:.1f} | {peak:.0f} |", flush=True)
    step = cfg["CFG, edge"][0]
    if args.compile:
        start = time.perf_counter()
        try:
            compile_stage("dit", dit, "torch")
            first = timed_step(device, dit, one, 3.0, 1, warmup=0)[0]
            seconds, out = timed_step(device, dit, one, 3.0, args.repeats, warmup=0)
            mean_err, max_err = errors(out.float().cpu(), cfg["CFG, edge"][1])
            rate = flops[("edge", 3.0)] / seconds / 1e12
            print(f"| CFG, edge, --compile torch (first call {first:.0f} s, {time.perf_counter() - start:.0f} s with "
                  f"compile; error vs eager mean {mean_err:.1e} max {max_err:.1e}) | {seconds:.3f} | {rate:.0f} | "
                  f"{100 * rate / args.peak_tflops:.1f} | |")
            step = min(step, seconds)
        except Exception as e:  # report and go on: the eager figures stand
            print(f"| --compile torch failed: {' '.join(str(e).split())[:200]} | | | | |")
    chunk = args.steps * step + args.vae_seconds
    print(f"\nprojected one edge chunk, {args.steps} CFG steps at {step:.3f} s + VAE {args.vae_seconds} s: {chunk:.1f} s; "
          "upstream published one GPU: " + ", ".join(f"{k} {v} s" for k, v in UPSTREAM_ONE_GPU.items()))
    print(f"\n| --step_cache taylorseer (schedule fixed by step index) | steps computed of {args.steps} | projected chunk s |")
    print("|---|---:|---:|")
    for interval in (2, 3, 4):
        computed = taylorseer_computed(args.steps, interval)
        print(f"| interval {interval}, warmup 2 | {computed} | {computed * step + args.vae_seconds:.1f} |")


def taylorseer_computed(steps: int, interval: int, warmup: int = 2) -> int:
    """Steps a ``taylorseer`` chunk computes (its schedule depends on the step index only)."""
    from transfer.families.transfer25.step_cache import StepCacheConfig, new_cache

    cache = new_cache(StepCacheConfig("taylorseer", interval=interval, warmup=warmup), steps)
    for i in range(steps):
        if not cache.skip(i):
            cache.record(i, (torch.zeros(1),))
    return len(cache.computed)


if __name__ == "__main__":
    main()
