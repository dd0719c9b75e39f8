"""Train the demo checkpoint on the demo world (``demo.world``): the same classes the product loads.

Work in progress (issue 20): only the ``vae`` stage exists yet; ``dit`` and ``export`` below are the plan.

Stages, each resumable from its own checkpoint in ``--work`` (model, optimizer, step, loss log):

* ``vae``: ``AutoencoderKLWan`` on rendered clips: L1 + MSE reconstruction of the decoder's output *before*
  diffusers' final clamp (the clamp passes no gradient where it bites) on the deterministic latents
  (``latent_dist.mode()``), plus a small KL term (warmed up over the first steps).
* ``dit`` (to do): ``CosmosTransformer3DModel`` + a ``CosmosControlNetModel`` for edge, rectified flow: ``x_t = (1 - t) x0 +
  t eps``, the target velocity ``eps - x0`` (what ``UniPCMultistepScheduler``'s ``flow_prediction`` integrates),
  ``t`` drawn from the sigmas the inference scheduler visits; a random number of leading latent frames held clean
  (timestep 0.1, as chunk conditioning does) and excluded from the loss; the prompt dropped 10% of the time (for
  guidance); the text encoder frozen.
* ``export`` (to do): the trained models, the frozen text encoder, tokenizer and scheduler in the diffusers layout
  (``--out``), loaded by the same code as any checkpoint.

Every random draw is seeded from (``--seed``, stage, step), so a resumed run continues exactly where a stopped one
would have been. Not imported by the inference path.

    python scripts/train_demo.py --work runs/demo --stage vae --steps 2000

Measured (2-core CPU, idle, batch 4 of 9-frame 64 x 64 clips, one step = encode + unclamped decode + backward):
base_dim 32 (7.3M parameters) ~43 s/step (with the test suite beside it); base_dim 8 (0.49M, this config) 1.1 s;
base_dim 16 with dim_mult [1, 2, 2] (0.65M) 1.5 s; base_dim 8 without temporal downsampling 1.2 s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from demo.world import TRAIN_SEEDS, Scene, render  # noqa: E402

#: The demo VAE: 4x spatial, 2x temporal (the pipeline reads both from the config), 16 latent channels.
DEMO_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
                latents_mean=[0.0] * 16, latents_std=[1.0] * 16)
FRAMES = 9  # pixel frames per training clip (1 + 4k: whole latent frames)


def clips(seed: int, step: int, batch: int, frames: int = FRAMES) -> tuple[torch.Tensor, list[Scene]]:
    """``batch`` rendered clips ``[B, 3, T, 64, 64]`` in [-1, 1] and their scenes, a function of (seed, step)."""
    rng = np.random.default_rng([seed, step])
    scenes = [Scene.from_seed(int(rng.integers(len(TRAIN_SEEDS))) + TRAIN_SEEDS.start) for _ in range(batch)]
    videos = np.stack([render(s, frames)[0] for s in scenes])  # [B, T, H, W, 3]
    x = torch.from_numpy(videos).float().div(127.5).sub(1.0).permute(0, 4, 1, 2, 3)
    return x.contiguous(), scenes


def decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """``AutoencoderKLWan._decode`` without its final clamp (diffusers 0.42.1's loop over latent frames with the
    causal feature cache), so the reconstruction loss has a gradient everywhere."""
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    out = []
    for i in range(z.shape[2]):
        vae._conv_idx = [0]
        out.append(vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=i == 0))
    vae.clear_cache()
    return torch.cat(out, 2)


class Stage:
    """A resumable training stage: ``state.pt`` (models, optimizer, step) and ``log.jsonl`` (one line per step)."""

    def __init__(self, work: Path, name: str, models: dict, lr: float):
        self.dir = work / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.models = models
        params = [p for m in models.values() for p in m.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        self.step = 0
        state = self.dir / "state.pt"
        if state.is_file():
            data = torch.load(state, weights_only=False)
            for key, model in models.items():
                model.load_state_dict(data["models"][key])
            self.optimizer.load_state_dict(data["optimizer"])
            self.step = data["step"]

    def save(self) -> None:
        tmp = self.dir / "state.pt.tmp"
        torch.save({"models": {k: m.state_dict() for k, m in self.models.items()},
                    "optimizer": self.optimizer.state_dict(), "step": self.step}, tmp)
        tmp.replace(self.dir / "state.pt")

    def log(self, record: dict) -> None:
        with open(self.dir / "log.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, **record}) + "\n")


def train_vae(args) -> None:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(args.seed)
    vae = AutoencoderKLWan(**DEMO_VAE)
    stage = Stage(args.work, "vae", {"vae": vae}, lr=args.lr or 1e-3)
    t0 = time.time()
    bar = tqdm(total=args.steps, initial=stage.step, desc="vae", unit="step")
    while stage.step < args.steps:
        torch.manual_seed(args.seed * 1_000_003 + stage.step)
        x, _ = clips(args.seed, stage.step, args.batch)
        posterior = vae.encode(x).latent_dist
        recon = decode_unclamped(vae, posterior.mode())
        l1, mse = F.l1_loss(recon, x), F.mse_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()
        warm = min(1.0, stage.step / 500)
        loss = l1 + mse + 1e-4 * warm * kl
        stage.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        stage.optimizer.step()
        stage.step += 1
        psnr = float(10 * torch.log10(4.0 / F.mse_loss(recon.detach().clamp(-1, 1), x)))
        stage.log({"loss": float(loss), "l1": float(l1), "kl": float(kl), "psnr": psnr, "minutes": (time.time() - t0) / 60})
        bar.update()
        bar.set_postfix(loss=f"{float(loss):.4f}", psnr=f"{psnr:.1f}")
        if stage.step % args.save_every == 0 or stage.step == args.steps:
            stage.save()
    bar.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="training folder (checkpoints and loss logs per stage)")
    p.add_argument("--stage", choices=("vae",), required=True)
    p.add_argument("--steps", type=int, required=True, help="train until this many steps in all (resumes)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save_every", type=int, default=50)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    {"vae": train_vae}[args.stage](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
