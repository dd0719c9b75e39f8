"""Sequence parallelism of one DiT step, measured side by side on CPU, then projected to H100s.

    python benchmarks/sequence_parallel.py            # sp 1/2/4, a 4-head DiT + ControlNet, 3 steps each
    python benchmarks/sequence_parallel.py --small    # reduced size, 1 step (a test runs it)

Part 1, measured (this machine, gloo, fp32, one torch thread per process): for sp = 1, 2, 4 the product's own
``transfer.distributed.sequence_parallel.enable`` on a random-weight 4-head Cosmos DiT and one ControlNet (diffusers
classes), one DiT step = ControlNet forward + DiT forward on the same inputs in every process: seconds per step
(median), bytes each rank sent per step (counted by wrapping the collectives this run calls), the same bytes from the
formula the projection uses (they must agree), and whether every rank's velocity equals the sp 1 velocity. On a
machine with fewer cores than processes the seconds only show that the split runs; they are not a speed-up.

Part 2, projected: one Transfer2.5-2B edge-control video, 720p (704 x 1280), 93 frames = one chunk, 36 steps, CFG,
on 1/2/4/8 GPUs with this fork's one-video presets (cfg 2 x sp N/2), next to upstream's published 502.6 / 154.5 /
92.5 s on 1/4/8 H100 (upstream's published table, docs/performance.md). Terms, and where each comes from:

* FLOPs of one forward (DiT 28 blocks + 4 ControlNet blocks at 84,480 tokens): counted from the model shapes here.
* one GPU's DiT seconds: upstream's 502.6 s minus the non-DiT critical path, i.e. upstream's own effective FLOP
  rate (assumed equal here: same models, same kernels).
* non-DiT critical path: the VAE's calls of the one chunk, MEASURED ``--vae_s`` (8.59 s: one control's encode 3.47 s +
  the decode 5.12 s, Transfer2.5-2B 93 x 704 x 1280 bf16 on one H200, the GPU-stacks issue), divided by the VAE
  group's degree (this fork's default on GPUs: every rank of the DiT group, ``transfer.distributed.vae_split``; the
  "VAE on one rank" column keeps it whole, as upstream and this fork before the VAE group), plus ASSUMED ``--other_s``
  (6.41 s: text encode, guardrails, I/O; 15 s of non-DiT path in all at one GPU, as before). One chunk cannot hide
  it behind the DiT, in upstream or here.
* bytes per rank (Ulysses all-to-alls + the velocity gather): ``bytes_per_forward``, checked against part 1's
  counted bytes, at bf16 and the real sizes.
* link: ASSUMED ``--link_gbps`` (300 GB/s effective all-to-all bandwidth per GPU: NVSwitch H100 SXM is 450 GB/s per
  direction), plus ASSUMED ``--latency_us`` (50 us) per collective: 4 all-to-alls per self-attention layer (84,480
  tokens divide by 2 and 4: the standard Ulysses path, no size exchanges) + 2 per forward (the gather), 2 per step for
  the CFG swap.
  Communication is not overlapped with compute (diffusers' Ulysses waits for each all-to-all).
* per-rank compute: DiT seconds / N (heads and tokens split evenly; the GEMMs keep >= 10,560 rows, assumed at the
  same efficiency). The CFG velocity exchange (21.6 MB per step) is counted on the same link.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

UPSTREAM_SECONDS = {1: 502.6, 4: 154.5, 8: 92.5}


def bench_configs(small: bool) -> tuple[dict, dict, tuple[int, int, int]]:
    """4-head DiT + ControlNet configs (random weights) and the latent size (T, h, w)."""
    from configs.models import preset

    base = preset("tiny-4head")
    width = {} if small else dict(attention_head_dim=32, img_context_dim_out=128)
    transformer = dict(base.transformer, **width, **({} if small else dict(num_layers=4, controlnet_block_every_n=2)))
    controlnet = dict(base.controlnet, **width, **({} if small else dict(model_channels=128)))
    latent = (2, 12, 18) if small else (4, 16, 24)
    return transformer, controlnet, latent


def bytes_per_forward(tokens: int, sp: int, layers: int, channels: int, out_channels: int, itemsize: int,
                      heads: int) -> float:
    """Bytes one rank sends per forward (the DiT + ControlNet step). Ulysses: per self-attention layer, q, k and v go
    out in an all-to-all and the output comes back in one, each moving (sp - 1) / sp of the rank's [tokens / sp,
    channels] tensor (uneven sizes: after an 8-byte size exchange, ``ulysses_anything``). Then the velocity's gather
    after ``proj_out``: the largest shard, padded, to every other rank, after its own size exchange."""
    if sp == 1:
        return 0.0
    ulysses = layers * 4 * (tokens / sp) * channels * itemsize * (sp - 1) / sp
    gather = -(-tokens // sp) * out_channels * itemsize * (sp - 1)
    uneven = bool(tokens % sp or heads % sp)
    sizes = 8 * (sp - 1) * (4 * layers * uneven + 1)
    return ulysses + gather + sizes


def worker(args) -> None:
    """One process of a measurement (under torchrun when sp > 1): times ``args.steps`` DiT steps, writes a JSON line."""
    import torch
    import torch.distributed as dist
    from diffusers import CosmosControlNetModel, CosmosTransformer3DModel

    torch.set_num_threads(1)
    transformer_cfg, controlnet_cfg, (T, h, w) = bench_configs(args.small)
    torch.manual_seed(0)
    dit = CosmosTransformer3DModel(**transformer_cfg).eval()
    net = CosmosControlNetModel(**controlnet_cfg).eval()
    g = torch.Generator().manual_seed(1)
    latents, controls = torch.randn(1, 16, T, h, w, generator=g), torch.randn(1, 16, T, h, w, generator=g)
    timestep = torch.rand(1, 1, T, 1, 1, generator=g)
    context = (torch.randn(1, 8, transformer_cfg["text_embed_dim"], generator=g),
               torch.zeros(1, transformer_cfg["img_context_num_tokens"], transformer_cfg["img_context_dim_in"]))
    cond_mask, pad = torch.zeros(1, 1, T, h, w), torch.zeros(1, 1, 8 * h, 8 * w)
    sent = [0]
    sp, rank = 1, 0
    if args.sp > 1:
        import torch.distributed._functional_collectives as funcol

        from transfer.distributed import sequence_parallel

        dist.init_process_group("cpu:gloo")
        sp, rank = dist.get_world_size(), dist.get_rank()
        branch = sequence_parallel.branch_meshes([tuple(range(sp))], "cpu")[tuple(range(sp))]
        sequence_parallel.enable({"transformer": dit, "controlnet": net}, branch).before_chunk(latents.shape)
        all_to_all, all_gather = funcol.all_to_all_single, dist.all_gather

        def counted_all_to_all(x, *a, **k):
            sent[0] += x.numel() * x.element_size() * (sp - 1) / sp
            return all_to_all(x, *a, **k)

        def counted_all_gather(out, x, *a, **k):
            sent[0] += x.numel() * x.element_size() * (sp - 1)
            return all_gather(out, x, *a, **k)

        funcol.all_to_all_single, dist.all_gather = counted_all_to_all, counted_all_gather

    def step():
        with torch.no_grad():
            residuals = net(controls_latents=controls, latents=latents, timestep=timestep, encoder_hidden_states=context,
                            condition_mask=cond_mask, conditioning_scale=1.0, padding_mask=pad, return_dict=False)[0]
            return dit(hidden_states=latents, timestep=timestep, encoder_hidden_states=context,
                       block_controlnet_hidden_states=residuals, condition_mask=cond_mask, padding_mask=pad,
                       return_dict=False)[0]

    out = step()  # warm-up (and the velocity compared across sp)
    sent[0] = 0
    seconds = []
    for _ in range(args.steps):
        if args.sp > 1:
            dist.barrier()
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    result = {"sp": sp, "rank": rank, "seconds": statistics.median(seconds), "bytes": sent[0] / args.steps,
              "velocity": out.flatten().tolist()}
    with open(args.worker, "a") as f:
        f.write(json.dumps(result) + "\n")
    if args.sp > 1:  # leave together: a rank exiting with the group alive aborted once under load ("terminate called
        dist.barrier()  # without an active exception", its gloo threads torn down by the interpreter)
        dist.destroy_process_group()


def measure(args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for sp in args.sp:
            path = Path(tmp) / f"sp{sp}.jsonl"
            extra = [str(ROOT / "benchmarks" / "sequence_parallel.py"), "--worker", str(path), "--sp_worker", str(sp),
                     "--steps", str(args.steps)] + (["--small"] if args.small else [])
            cmd = [sys.executable, *extra] if sp == 1 else [
                sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(sp), *extra]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"sp {sp} failed:\n{proc.stderr[-3000:]}")
            rows.append([json.loads(x) for x in path.read_text().splitlines()])
    return rows


def collectives_per_forward(layers: int) -> int:
    """Collectives one rank enters per forward at even sizes: per self-attention layer 4 all-to-alls; then the velocity
    gather and its size exchange."""
    return 4 * layers + 2


def project(link_gbps: float, other_s: float, latency_us: float, vae_s: float = 8.59, steps: int = 36) -> list[tuple]:
    """One Transfer2.5-2B 720p 93-frame edge video on N GPUs (see the module docstring for every term)."""
    from configs.models import preset

    cfg = preset("transfer2.5-2b")
    t = cfg.transformer
    C, layers = t["num_attention_heads"] * t["attention_head_dim"], t["num_layers"] + cfg.controlnet["n_controlnet_blocks"]
    N = 24 * (704 // 16) * (1280 // 16)  # latent frames x patches = 84,480 tokens
    flops = layers * (28 * N * C * C + 4 * N * N * C)  # linear layers (qkvo, cross q/o, 4x MLP) + attention
    dit_one = UPSTREAM_SECONDS[1] - other_s - vae_s
    forwards = 2 * steps  # CFG: two branches per step
    velocity_bytes = 16 * 24 * 88 * 160 * 4
    rows = []
    for gpus in (1, 2, 4, 8):
        cfg_split = 2 if gpus >= 2 else 1
        sp = gpus // cfg_split
        compute = dit_one / gpus
        ulysses = bytes_per_forward(N, sp, layers, C, 64, 2, t["num_attention_heads"])
        exchange = velocity_bytes if cfg_split == 2 else 0.0
        calls = (collectives_per_forward(layers) if sp > 1 else 0) + (2 if cfg_split == 2 else 0)
        # each rank runs one branch: one forward per step
        comm = steps * ((ulysses + exchange) / (link_gbps * 1e9) + calls * latency_us * 1e-6)
        one_vae = other_s + vae_s + compute + comm
        total = other_s + vae_s / gpus + compute + comm  # the VAE group: every rank of the DiT group
        up = UPSTREAM_SECONDS.get(gpus)
        rows.append((gpus, f"{cfg_split}x{sp}", forwards * flops / 1e15, ulysses / 1e9, comm, one_vae, total,
                     UPSTREAM_SECONDS[1] / total, up, UPSTREAM_SECONDS[1] / up if up else None))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="reduced model and size, 1 step (the suite runs this)")
    p.add_argument("--steps", type=int, help="timed steps per sp (default 3; --small 1)")
    p.add_argument("--sp", type=int, nargs="+", default=[1, 2, 4], help="sequence-parallel degrees (default 1 2 4)")
    p.add_argument("--link_gbps", type=float, default=300.0, help="assumed all-to-all GB/s per GPU (default 300)")
    p.add_argument("--other_s", type=float, default=6.41,
                   help="assumed non-DiT, non-VAE seconds of one video: text, guardrails, I/O (default 6.41)")
    p.add_argument("--vae_s", type=float, default=8.59,
                   help="the VAE seconds of the one chunk on one GPU (default 8.59: measured on one H200, "
                   "encode 3.47 + decode 5.12)")
    p.add_argument("--latency_us", type=float, default=50.0,
                   help="assumed fixed cost of one collective in microseconds (default 50)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--sp_worker", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.steps = args.steps or (1 if args.small else 3)
    if args.worker:
        args.sp = args.sp_worker
        worker(args)
        return
    import numpy as np

    transformer_cfg, controlnet_cfg, (T, h, w) = bench_configs(args.small)
    tokens = T * (h // 2) * (w // 2)
    C = transformer_cfg["num_attention_heads"] * transformer_cfg["attention_head_dim"]
    layers = transformer_cfg["num_layers"] + controlnet_cfg["n_controlnet_blocks"]
    print(f"part 1, measured on this machine ({os.cpu_count()} cores, gloo, fp32, 1 thread per process): one DiT step = "
          f"ControlNet + DiT forward, {transformer_cfg['num_attention_heads']} heads x "
          f"{transformer_cfg['attention_head_dim']}, {layers} self-attention layers, {tokens} tokens, {args.steps} step(s)")
    head = f"{'sp':>3}{'s/step':>10}{'vs sp 1':>9}{'bytes/step/rank':>17}{'formula':>12}{'velocity = sp 1':>17}"
    print(head + "\n" + "-" * len(head))
    measured = measure(args)
    base = measured[0][0]
    for ranks in measured:
        sp = ranks[0]["sp"]
        seconds = max(r["seconds"] for r in ranks)  # the slowest rank sets the step
        counted = max(r["bytes"] for r in ranks)
        formula = bytes_per_forward(tokens, sp, layers, C, 4 * transformer_cfg["out_channels"], 4,
                                    transformer_cfg["num_attention_heads"])
        same = all(np.array_equal(np.array(r["velocity"]), np.array(base["velocity"])) for r in ranks)
        print(f"{sp:>3}{seconds:>10.4f}{base['seconds'] / seconds:>8.2f}x{counted:>17,.0f}{formula:>12,.0f}"
              f"{'yes' if same else 'NO':>17}")
    print("(bytes/step/rank: counted = the payload of the collectives this rank called; formula = bytes_per_forward, "
          "which part 2 uses)")

    print(f"\npart 2, projected: Transfer2.5-2B edge, 720p 93 frames (84,480 tokens), 36 steps with CFG; link "
          f"{args.link_gbps:g} GB/s and {args.latency_us:g} us per collective (assumed); non-DiT path: VAE "
          f"{args.vae_s:g} s (measured, one H200) / the VAE group's degree + {args.other_s:g} s other (assumed)")
    head = (f"{'GPUs':>4}  {'cfg x sp':<9}{'PFLOP':>7}{'GB/fwd/rank':>13}{'comm s':>8}{'VAE 1 rank s':>14}{'ours s':>8}"
            f"{'ours x':>8}{'upstream s':>12}{'upstream x':>12}")
    print(head + "\n" + "-" * len(head))
    for gpus, shape, pflop, gb, comm, one_vae, total, speed, up, up_speed in project(
            args.link_gbps, args.other_s, args.latency_us, args.vae_s):
        up_s = f"{up:>12.1f}" if up else f"{'-':>12}"
        up_x = f"{up_speed:>11.2f}x" if up_speed else f"{'-':>12}"
        print(f"{gpus:>4}  {shape:<9}{pflop:>7.0f}{gb:>13.2f}{comm:>8.2f}{one_vae:>14.1f}{total:>8.1f}{speed:>7.2f}x"
              f"{up_s}{up_x}")
    print("ours s = with the VAE group over every rank (VAE seconds / GPUs); VAE 1 rank s = the same with the VAE "
          "whole on one rank; ours x = upstream's 1-GPU 502.6 s over ours s; the DiT's one-GPU time is upstream's "
          "minus the non-DiT path; per-rank compute assumed to split evenly. Not measured on GPUs "
          "(benchmarks/gpu_check.sh).")


if __name__ == "__main__":
    main()
