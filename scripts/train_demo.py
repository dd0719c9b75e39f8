"""Train the demo checkpoint on the demo world (``demo.world``): the same classes the product loads.

Stages, each resumable from its own checkpoint in ``--work`` (models, optimizer, step, loss log):

* ``vae``: ``AutoencoderKLWan`` (``configs.models.DEMO_VAE``) on rendered clips: L1 + MSE reconstruction of the
  decoder's output *before* diffusers' final clamp (the clamp passes no gradient where it bites) on the
  deterministic latents (``latent_dist.mode()``), plus a small KL term (warmed up over the first 500 steps).
* ``dit``: ``CosmosTransformer3DModel`` + a ``CosmosControlNetModel`` for edge and the demo's T5 over a word-level
  tokenizer of the world's words (all ``configs.models.demo``; the T5 trained along from random weights), rectified
  flow: ``x_t = (1 - t) x0 + t eps``, the target velocity ``eps - x0`` (what ``UniPCMultistepScheduler``'s
  ``flow_prediction`` integrates), ``log(t / (1 - t))`` uniform over the inference scheduler's noise range
  (``flow_times``); for half the clips the first latent frame held clean (timestep 0.1, as chunk conditioning does)
  and excluded from the loss; the prompt replaced by the default negative prompt 10% of the time (for guidance);
  the edge control is the project's edge preprocessor on the clip; the velocity comes from the product's own
  ``transfer.families.transfer25.models.Denoiser.velocity`` (the inference arithmetic, ControlNet residuals included). ``--keep_every N``
  also keeps the models every N steps. Options the shipped recipe does not use (tried, docs/demo.md: no gain in
  shape color at 16-17 minutes): ``--image_steps K`` trains the first K steps on single frames, ``--image_batch``
  of them per step (about 4x the scenes per second); ``--shape_weight A`` weighs each latent cell's loss by
  1 + A x its shape coverage; ``--dit_name NAME --init dit`` trains a second run in ``--work/NAME`` starting from the
  first's models (a fine-tune; export it with ``--dit_name NAME``).
* ``corpus``: ``--clips`` training clips encoded once (the VAE is frozen while the DiT trains): the VAE's latents of
  each clip and of its edge control (float16), the shapes' coverage and the prompt, in shards of ``--shard`` under
  ``work/corpus``. ``dit --corpus`` then draws its batches from them: no rendering, Canny or VAE per step. With
  ``--compile`` (each DiT and ControlNet block ``torch.compile``d), the batch's prompts through the T5 in one call, and
  the 512-token text context's padding attended as one weighted zero key (``PaddingAsOneToken``: the same attention),
  the loop runs about five times the clips per second of the shipped run's (benchmarks/train_throughput.py).
* ``export``: the trained models, the tokenizer and the scheduler in the diffusers layout (``--out``, default the
  shipped ``demo/checkpoint``), with ``transfer_defaults.json`` (the checkpoint's own generation defaults) and
  ``training.json``; loaded by the same code as any checkpoint.

Learning rate: constant, then a cosine down to a tenth over the last quarter of ``--steps``. Every random draw is
seeded from (``--seed``, stage, step) and made on the CPU, so a resumed run continues exactly where a stopped one
would have been (give the same ``--steps`` and ``--threads``: the sums' order follows the thread count).
``--device cuda`` trains on a GPU (float32; not bit-identical to the CPU; not yet run on one). Not imported by the
inference path. The shipped weights (docs/demo.md):

    python scripts/train_demo.py --work runs/demo --stage vae --steps 3200 --threads 2
    python scripts/train_demo.py --work runs/demo --stage dit --steps 4600 --keep_every 1150 --threads 2
    python scripts/train_demo.py --work runs/demo --stage export
    python benchmarks/quality.py

Issue 40's model (docs/demo.md; the narrowed world, a fine-tune of the first shipped model):

    python scripts/train_demo.py --work runs/demo40 --stage vae_from
    python scripts/train_demo.py --work runs/demo40 --stage corpus --clips 20480 --threads 2
    python scripts/train_demo.py --work runs/demo40 --stage dit --corpus --compile --init_from DEMO_V1 \
        --batch 32 --steps 2800 --keep_every 600 --shape_weight 1 --threads 2
    python scripts/train_demo.py --work runs/demo40 --stage export

(DEMO_V1: ``demo/checkpoint`` as of commit 84c642f, the model before it.)

Measured (2-core CPU, idle, batch 4 of 9-frame 64 x 64 clips): the vae stage ~1.05 s/step (3200 steps: 54 min),
the first model's dit stage ~1.4 s/step (4600 steps: 108 min); issue 40's corpus stage 50 s per 1024 clips, its dit
stage 1.35 s/step at batch 32. Trying VAE sizes: base_dim 32 (7.3M parameters) ~43 s/step (with
the test suite beside it); base_dim 8 (0.49M, this config) 1.1 s; base_dim 16 with dim_mult [1, 2, 2] (0.65M) 1.5 s;
base_dim 8 without temporal downsampling 1.2 s.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.models import DEMO_CHECKPOINT, DEMO_VAE, demo  # noqa: E402
from demo.world import TRAIN_SEEDS, WORDS, Scene, render  # noqa: E402

FRAMES = 9  # pixel frames per training clip (1 + 4k: whole latent frames)


def clips(seed: int, step: int, batch: int, frames: int = FRAMES) -> tuple[torch.Tensor, list[Scene], torch.Tensor]:
    """``batch`` rendered clips ``[B, 3, T, 64, 64]`` in [-1, 1], their scenes and where any shape is (bool
    ``[B, T, 64, 64]``), a function of (seed, step)."""
    rng = np.random.default_rng([seed, step])
    scenes = [Scene.from_seed(int(rng.integers(len(TRAIN_SEEDS))) + TRAIN_SEEDS.start) for _ in range(batch)]
    rendered = [render(s, frames) for s in scenes]
    videos = np.stack([video for video, _ in rendered])  # [B, T, H, W, 3]
    shapes = torch.from_numpy(np.stack([masks.any(1) for _, masks in rendered]))
    x = torch.from_numpy(videos).float().div(127.5).sub(1.0).permute(0, 4, 1, 2, 3)
    return x.contiguous(), scenes, shapes


def latent_coverage(shapes: torch.Tensor, temporal: int, spatial: int) -> torch.Tensor:
    """``[B, 1, T', h, w]``: the fraction of each latent cell's pixels covered by a shape (``shapes``: bool
    ``[B, T, H, W]``), a latent frame taking the most covered of the pixel frames it encodes (frame 0 alone, then
    ``temporal`` frames each: the causal VAE's grouping)."""
    m = shapes.float()
    rest = m[:, 1:]
    if rest.shape[1]:
        rest = rest.reshape(m.shape[0], -1, temporal, *m.shape[2:]).amax(2)
    m = torch.cat([m[:, :1], rest], 1)
    return F.avg_pool2d(m, spatial).unsqueeze(1)  # frames as channels: pools height and width


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


def shown(path: Path) -> str:
    """``path`` as a record shows it: relative to the repository when inside it (no machine's folders in a checkpoint)."""
    root = Path(__file__).resolve().parents[1]
    path = Path(path).resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def lr_at(step: int, total: int, base: float) -> float:
    """Constant ``base`` for the first three quarters of ``total`` steps, then a cosine down to ``base / 10`` (a
    function of the step and ``--steps``: resume with the same ``--steps`` to reproduce a run)."""
    start = 0.75 * total
    if step < start:
        return base
    return base * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - start) / (total - start)))))


class Stage:
    """A resumable training stage: ``state.pt`` (models, optimizer, step) and ``log.jsonl`` (one line per step)."""

    def __init__(self, work: Path, name: str, models: dict, lr: float, init: str | None = None):
        """``init``: a fresh stage starts its models from ``work/init/state.pt`` (a fine-tune; not its optimizer)."""
        self.lr = lr
        self.dir = work / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.models = models
        params = [p for m in models.values() for p in m.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        self.step = 0
        state = self.dir / "state.pt"
        source = state if state.is_file() else work / init / "state.pt" if init else None
        if source:
            data = torch.load(source, map_location="cpu", weights_only=False)
            for key, model in models.items():
                model.load_state_dict(data["models"][key])
        if state.is_file():
            self.optimizer.load_state_dict(data["optimizer"])
            self.step = data["step"]
        log = self.dir / "log.jsonl"
        if log.is_file():  # steps logged after the last save are trained again: drop their lines
            lines = log.read_text().splitlines()
            log.write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= self.step))

    def set_lr(self, total: int) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, total, self.lr)

    def save(self) -> None:
        tmp = self.dir / "state.pt.tmp"
        torch.save({"models": self.model_states(), "optimizer": self.optimizer.state_dict(), "step": self.step}, tmp)
        tmp.replace(self.dir / "state.pt")

    def snapshot(self) -> None:
        """Keep the models as they are now (``snapshots/<step>.pt``): ``export --snapshot`` writes them out, for a
        curve of quality against training time."""
        (self.dir / "snapshots").mkdir(exist_ok=True)
        torch.save({"models": self.model_states(), "step": self.step}, self.dir / "snapshots" / f"{self.step}.pt")

    def model_states(self) -> dict:
        return {k: m.state_dict() for k, m in self.models.items()}

    def log(self, record: dict) -> None:
        with open(self.dir / "log.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, **record}) + "\n")


def train_vae(args) -> None:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(args.seed)
    vae = AutoencoderKLWan(**DEMO_VAE).to(args.device)
    stage = Stage(args.work, "vae", {"vae": vae}, lr=args.lr or 1e-3)
    t0 = time.time()
    bar = tqdm(total=args.steps, initial=stage.step, desc="vae", unit="step")
    while stage.step < min(args.steps, args.stop_at or args.steps):
        torch.manual_seed(args.seed * 1_000_003 + stage.step)
        stage.set_lr(args.steps)
        x = clips(args.seed, stage.step, args.batch)[0].to(args.device)
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
        if stage.step % args.save_every == 0 or stage.step in (args.steps, args.stop_at):
            stage.save()
    bar.close()


def demo_dit_configs(patch: int = 2) -> tuple[dict, dict]:
    """The demo DiT and its edge ControlNet (``configs.models.demo``), with a spatial patch of ``patch`` latent cells
    (``--patch``: 1 gives each latent cell, 4 x 4 pixels, a token of its own: four times the tokens of 2)."""
    cfg = demo()
    for c in (cfg.transformer, cfg.controlnet):
        c["patch_size"] = (1, patch, patch)
    return cfg.transformer, cfg.controlnet


def stage_patch(work: Path, name: str, patch: int | None, start: bool = False) -> int:
    """The spatial patch of the dit stage ``work/name``: fixed when the stage starts (``start``: written to
    ``model.json``), read back on resume and at export (a stage from before the flag: 2); ``patch`` (``--patch``) must
    agree with it."""
    record = work / name / "model.json"
    if record.is_file():
        kept = json.loads(record.read_text())["patch"]
        if patch is not None and patch != kept:
            raise SystemExit(f"train_demo.py: error: {work / name} was started with --patch {kept}, not {patch}")
        return kept
    patch = patch or 2
    if start:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"patch": patch}) + "\n")
    return patch


def demo_tokenizer():
    """The demo's word-level tokenizer over its world's words (``demo.world.WORDS``)."""
    from transfer.embedded_checkpoint import build_tokenizer

    return build_tokenizer(chat=False, words=WORDS)


def demo_text_model():
    """The demo's T5 encoder (``configs.models.demo``), initialised from the current torch seed."""
    from transformers import T5EncoderModel

    return T5EncoderModel(demo().text_config())


def load_vae(work: Path):
    """The trained demo VAE (frozen), with its latents' per-channel mean and std (measured once, kept in the work
    folder: they go into the exported config, as real checkpoints carry theirs). ``--stage vae_from`` puts an
    exported checkpoint's VAE there instead of training one."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(**DEMO_VAE)
    if not (work / "vae" / "state.pt").is_file():
        raise SystemExit(f"train_demo.py: error: no trained VAE in {work / 'vae'}: run --stage vae, or --stage "
                         "vae_from --out CHECKPOINT to take an exported checkpoint's")
    vae.load_state_dict(torch.load(work / "vae" / "state.pt", map_location="cpu", weights_only=False)["models"]["vae"])
    vae.requires_grad_(False).eval()
    stats = work / "vae" / "latent_stats.json"
    if not stats.is_file():
        with torch.no_grad():
            z = torch.cat([vae.encode(clips(12345, k, 4)[0]).latent_dist.mode() for k in range(8)])
        mean, std = z.mean(dim=(0, 2, 3, 4)), z.std(dim=(0, 2, 3, 4))
        stats.write_text(json.dumps({"mean": mean.tolist(), "std": std.tolist()}))
    data = json.loads(stats.read_text())
    vae.register_to_config(latents_mean=data["mean"], latents_std=data["std"])
    return vae


def vae_from(args) -> None:
    """The VAE of an exported checkpoint (``--out``, default the shipped demo/checkpoint) as this work folder's vae
    stage: its weights as ``vae/state.pt`` and its latent statistics as ``vae/latent_stats.json``, so a new DiT can
    train on the shipped VAE without retraining it; its ``log.jsonl`` is one line naming where it came from (export
    records that instead of a loss)."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(args.out / "vae")
    folder = args.work / "vae"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"models": {"vae": vae.state_dict()}, "step": 0}, folder / "state.pt")
    (folder / "latent_stats.json").write_text(json.dumps({"mean": list(vae.config.latents_mean),
                                                          "std": list(vae.config.latents_std)}))
    if not (folder / "log.jsonl").is_file():
        (folder / "log.jsonl").write_text(json.dumps({"step": 0, "loss": 0.0, "minutes": 0.0,
                                                      "from": shown(args.out)}) + "\n")
    print(f"vae stage of {args.work} taken from {args.out / 'vae'}")


def flow_times(n: int, generator: torch.Generator) -> torch.Tensor:
    """Noise levels ``t`` for training: ``log(t / (1 - t))`` uniform over the inference scheduler's range (Transfer2.5's
    Karras sigmas from ``sigma_min`` 0.01 to ``sigma_max`` 200, as flow sigmas ``t = s / (1 + s)``: 0.0099 .. 0.995).
    Half of a 20-step schedule lies above t = 0.93, where the control and prompt must carry the whole image; a
    logit-normal t (mean 0, std 1) almost never reaches it, and a model trained so samples grey mush (measured)."""
    from configs.models import TRANSFER25_SCHEDULER

    lo, hi = math.log(TRANSFER25_SCHEDULER["sigma_min"]), math.log(TRANSFER25_SCHEDULER["sigma_max"])
    return torch.sigmoid(lo + (hi - lo) * torch.rand(n, generator=generator))


def encode_prompts(text_model, tokenizer, prompts: list[str], device, pad: bool = True) -> torch.Tensor:
    """T5 embeddings ``[B, 512, D]`` of ``prompts`` in one call, with gradients: the encoder runs over the longest
    prompt's tokens only and the rest is zeros, which is what the product's ``TextEncoder`` gives (it pads to 512 and
    zeroes past each prompt; T5's masked attention makes a prompt's embeddings independent of the padding's length;
    equal within float rounding, tests/test_train_demo.py). ``pad=False``: ``[B, longest, D]``, without the zeros."""
    from transfer.families.transfer25.text_encoding import MAX_SEQUENCE_LENGTH

    inputs = tokenizer(prompts, padding="longest", return_tensors="pt")
    mask = inputs["attention_mask"].to(device)
    embeds = text_model(inputs["input_ids"].to(device), attention_mask=mask.bool()).last_hidden_state
    embeds = embeds * mask[..., None]
    return F.pad(embeds, (0, 0, 0, MAX_SEQUENCE_LENGTH - embeds.shape[1])) if pad else embeds


class PaddingAsOneToken:
    """The DiT's and ControlNet's cross-attention processor in training: diffusers' own ``CosmosAttnProcessor2_5``,
    given the text trimmed to the batch's longest prompt plus one zero token whose attention logit is raised by
    ``log(512 - longest)`` (``mask``). A zero text embedding has a zero key and a zero value (no bias in ``to_k`` /
    ``to_v``, RMS norm of zero is zero): each of the 512-token context's padding positions adds ``exp(0)`` to the
    softmax's sum and nothing to its output, so one zero key weighted ``512 - longest`` gives the same attention over
    5x fewer keys (with the 103-token negative prompt; 40x without) (equal within float rounding,
    tests/test_train_demo.py)."""

    def __init__(self, inner):
        self.inner, self.mask = inner, None

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        return self.inner(attn, hidden_states, encoder_hidden_states, (self.mask, None), image_rotary_emb)


def short_context(embeds: torch.Tensor, processors: list[PaddingAsOneToken]) -> torch.Tensor:
    """``embeds`` ``[B, L, D]`` (``encode_prompts(pad=False)``) with the one zero token appended; sets the processors'
    mask for it."""
    from transfer.families.transfer25.text_encoding import MAX_SEQUENCE_LENGTH

    length = embeds.shape[1]
    mask = torch.zeros(1, 1, 1, length + 1, device=embeds.device, dtype=embeds.dtype)
    mask[..., -1] = math.log(MAX_SEQUENCE_LENGTH - length)
    for p in processors:
        p.mask = mask
    return F.pad(embeds, (0, 0, 0, 1))


class DitTrainer:
    """The dit stage's models and one training step, fed either way: ``online`` renders clips, computes their edge
    controls and VAE-encodes both every step (the recipe of the shipped run); ``from_corpus`` draws them from a
    corpus encoded once (``--stage corpus``; the VAE is frozen, so its latents of a clip never change). ``timings``
    (a dict, optional) accumulates seconds per phase: benchmarks/train_throughput.py prints them."""

    def __init__(self, args, timings: dict | None = None):
        from diffusers import CosmosControlNetModel, CosmosTransformer3DModel, UniPCMultistepScheduler

        from configs.models import TRANSFER25_SCHEDULER
        from preprocessors import edge
        from transfer.families.transfer25.models import Denoiser, VideoVAE
        from transfer.families.transfer25.text_encoding import TextEncoder

        self.args, self.timings = args, timings
        self.device = device = torch.device(args.device)
        self.vae = VideoVAE(load_vae(args.work).to(device), device)
        torch.manual_seed(args.seed + 1)  # the models' initial weights (drawn on the CPU whatever --device)
        t_cfg, c_cfg = demo_dit_configs(stage_patch(args.work, args.dit_name, args.patch, start=True))
        transformer, controlnet = CosmosTransformer3DModel(**t_cfg), CosmosControlNetModel(**c_cfg)
        self.text_model, self.tokenizer = demo_text_model(), demo_tokenizer()
        fresh = not (args.work / args.dit_name / "state.pt").is_file()  # else the stage resumes its own state
        if args.init_from and fresh:  # a fine-tune of an exported checkpoint's DiT, ControlNet and T5 (recorded)
            record = args.work / args.dit_name / "model.json"
            source = {"path": shown(args.init_from)}
            if (args.init_from / "training.json").is_file():  # what that checkpoint was (its path may be reused)
                source["training"] = json.loads((args.init_from / "training.json").read_text())
            record.write_text(json.dumps({**json.loads(record.read_text()), "init_from": source}) + "\n")
            for model, folder in ((transformer, "transformer"), (controlnet, "controlnet/edge"),
                                  (self.text_model, "text_encoder")):
                model.load_state_dict(type(model).from_pretrained(args.init_from / folder).state_dict())
        transformer, controlnet = transformer.to(device), controlnet.to(device)
        self.text_model = self.text_model.to(device).train()
        self.text = TextEncoder(self.text_model, self.tokenizer, device, torch.float32)
        self.dit = Denoiser(transformer, {"edge": controlnet}, UniPCMultistepScheduler(**TRANSFER25_SCHEDULER), device)
        self.models = {"transformer": transformer, "controlnet": controlnet, "text_encoder": self.text_model}
        self.canny = edge.Preprocessor(edge.Config())
        self.corpus = load_corpus(args.work) if args.corpus else None
        self.short = []  # the cross-attention processors over the short context (all but the "before" loop)
        if not getattr(args, "per_prompt_t5", False):
            for block in (*transformer.transformer_blocks, *controlnet.control_blocks):
                block.attn2.set_processor(PaddingAsOneToken(block.attn2.processor))
                self.short.append(block.attn2.processor)
        if args.compile:  # regional compile: each repeated block once (as --compile torch does at inference)
            for block in (*transformer.transformer_blocks, *controlnet.control_blocks):
                block.compile()

    def tick(self, name: str, since: float) -> float:
        now = time.perf_counter()
        if self.timings is not None:
            self.timings[name] = self.timings.get(name, 0.0) + now - since
        return now

    def online(self, step: int, batch: int, frames: int = FRAMES, batched: bool = False):
        """Rendered clips, their edge controls and both encoded, now: ``(z0, zc, prompts, cover)``. ``batched``: the
        VAE encodes the whole batch in one call (the corpus stage) instead of a clip at a time (as inference does,
        and the shipped run did)."""
        t = time.perf_counter()
        x, scenes, shapes = clips(self.args.seed, step, batch, frames)
        t = self.tick("render scenes", t)
        video = ((x.permute(0, 2, 3, 4, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        control = torch.from_numpy(np.stack([self.canny(f) for f in video])).float().div(127.5).sub(1)
        t = self.tick("edge control (Canny)", t)
        control = control.permute(0, 4, 1, 2, 3)
        with torch.no_grad():
            if batched:
                vae, mean, std = self.vae.vae, self.vae.mean.to(self.device), self.vae.std.to(self.device)
                z0, zc = ((vae.encode(v.to(self.device)).latent_dist.mode() - mean) / std for v in (x, control))
            else:
                z0, zc = self.vae.encode(x, torch.float32), self.vae.encode(control, torch.float32)
        self.tick("VAE encode (video + control)", t)
        cover = latent_coverage(shapes, self.vae.temporal_factor, self.vae.spatial_factor)
        return z0, zc, [s.prompt for s in scenes], cover

    def from_corpus(self, step: int, batch: int):
        """``batch`` clips of the corpus, drawn with replacement as a function of (seed, step)."""
        t = time.perf_counter()
        c = self.corpus
        index = torch.from_numpy(np.random.default_rng([self.args.seed, step, 7]).integers(len(c["prompts"]),
                                                                                          size=batch))
        out = (c["z0"][index].float(), c["zc"][index].float(), [c["prompts"][i] for i in index.tolist()],
               c["cover"][index].float() / 255)
        self.tick("corpus batch", t)
        return out

    def step(self, stage: "Stage", z0, zc, prompts, cover) -> float:
        """One optimizer step of rectified flow on these latents; returns the loss."""
        from transfer.specs import DEFAULT_NEGATIVE_PROMPT
        from transfer.families.transfer25.models import CONDITIONAL_FRAME_TIMESTEP

        args, device = self.args, self.device
        t = time.perf_counter()
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + stage.step)
        z0, zc = z0.to(device), zc.to(device)
        B, _, T, h, w = z0.shape  # every draw below on the CPU generator, then moved: the same draws on any device
        tt = flow_times(B, g).view(B, 1, 1, 1, 1).to(device)
        noise = torch.randn(z0.shape, generator=g).to(device)
        x_t = (1 - tt) * z0 + tt * noise
        cond = (torch.rand(B, generator=g) < (0.0 if T == 1 else 0.5)).float().view(B, 1, 1, 1, 1).to(device)
        cond_mask = torch.zeros(B, 1, T, 1, 1, device=device)  # frame 0 given clean where cond
        cond_mask[:, :, :1] = cond
        in_latents = cond_mask * z0 + (1 - cond_mask) * x_t
        timestep = cond_mask * CONDITIONAL_FRAME_TIMESTEP + (1 - cond_mask) * tt
        drop = torch.rand(B, generator=g) < args.prompt_dropout  # the negative prompt instead: guidance learns
        prompts = [DEFAULT_NEGATIVE_PROMPT if d else p for d, p in zip(drop, prompts)]
        t = self.tick("noise draws", t)
        if self.short:
            embeds = short_context(encode_prompts(self.text_model, self.tokenizer, prompts, device, pad=False),
                                   self.short)
        else:  # the shipped run's way (benchmarks/train_throughput.py's "before")
            embeds = torch.cat([self.text._encode_t5(p) for p in prompts])
        context = self.dit.context(embeds)
        if isinstance(context, tuple) and self.short:
            # The image context is zeros: its 256 tokens are one token repeated (same key, same value), so attention
            # over them is that token's value whatever the query. One token gives the same output, 256x cheaper.
            context = (context[0], context[1][:, :1])
        t = self.tick("T5 forward", t)
        full_mask = cond_mask.expand(B, 1, T, h, w)
        padding = torch.zeros(1, 1, h * self.vae.spatial_factor, w * self.vae.spatial_factor, device=device)
        velocity = self.dit.velocity(in_latents, timestep, context, {"edge": zc}, {"edge": 1.0}, full_mask, padding)
        weight = 1 - full_mask
        if args.shape_weight:  # the shapes' cells count more: they are a small part of the frame, and their colour
            weight = weight * (1 + args.shape_weight * cover.to(device))
        loss = (((velocity - (noise - z0)) ** 2) * weight).sum() / (weight.sum() * z0.shape[1])
        t = self.tick("DiT + ControlNet forward", t)
        stage.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t = self.tick("backward", t)
        torch.nn.utils.clip_grad_norm_([p for m in stage.models.values() for p in m.parameters()], 1.0)
        stage.optimizer.step()
        self.tick("optimizer", t)
        stage.step += 1
        return loss.item()


def train_dit(args) -> None:
    """Rectified flow on the demo world, through the product's own ``stages.Denoiser.velocity`` (the inference
    arithmetic), on clips made each step or drawn from the corpus (``--corpus``)."""
    trainer = DitTrainer(args)
    stage = Stage(args.work, args.dit_name, trainer.models, lr=args.lr or 3e-4, init=args.init)
    t0 = time.time()
    bar = tqdm(total=args.steps, initial=stage.step, desc=args.dit_name, unit="step")
    while stage.step < min(args.steps, args.stop_at or args.steps):
        stage.set_lr(args.steps)
        if trainer.corpus is not None:
            batch = trainer.from_corpus(stage.step, args.batch)
        else:
            image = stage.step < args.image_steps  # the per-frame phase: single frames, a larger batch
            batch = trainer.online(stage.step, args.image_batch if image else args.batch, 1 if image else FRAMES)
        loss = trainer.step(stage, *batch)
        stage.log({"loss": loss, "minutes": (time.time() - t0) / 60})
        bar.update()
        bar.set_postfix(loss=f"{loss:.4f}")
        if stage.step % args.save_every == 0 or stage.step in (args.steps, args.stop_at):
            stage.save()
        if args.keep_every and stage.step % args.keep_every == 0:
            stage.snapshot()
    bar.close()


def build_corpus(args) -> None:
    """``--clips`` training clips encoded once, in shards of ``--shard`` (a stopped stage resumes at the first missing
    shard): ``work/corpus/shard_<k>.pt`` holds the VAE's
    normalised latents of each clip and of its edge control (float16, ``[n, 16, 5, 16, 16]``: 80 KB a clip), the
    shapes' coverage of each latent cell (uint8) and the prompts. Shard k's clips are ``clips(seed, k * 10000 + j,
    n)`` for j < shard / n, n = min(64, shard) (scenes from the training seeds): the corpus is a function of
    ``--seed``, ``--shard`` and its size."""
    trainer = DitTrainer(argparse.Namespace(**{**vars(args), "corpus": False, "compile": False, "init_from": None}))
    folder = args.work / "corpus"
    folder.mkdir(parents=True, exist_ok=True)
    shards, n = math.ceil(args.clips / args.shard), min(64, args.shard)
    for k in tqdm(range(shards), desc="corpus", unit="shard"):
        path = folder / f"shard_{k:04d}.pt"
        if path.is_file():
            continue
        parts = [trainer.online(k * 10_000 + j, n, batched=True) for j in range(args.shard // n)]
        z0, zc, cover = (torch.cat([p[i] for p in parts]) for i in (0, 1, 3))
        prompts = [p for part in parts for p in part[2]]
        tmp = path.with_suffix(".tmp")
        torch.save({"z0": z0.half(), "zc": zc.half(), "cover": (cover * 255).round().to(torch.uint8),
                    "prompts": prompts}, tmp)
        tmp.replace(path)


def load_corpus(work: Path) -> dict:
    """Every shard of ``work/corpus`` in one dict of tensors (``build_corpus``)."""
    paths = sorted((work / "corpus").glob("shard_*.pt"))
    if not paths:
        raise SystemExit(f"train_demo.py: error: no corpus in {work / 'corpus'}: run --stage corpus --clips N first")
    shards = [torch.load(p, weights_only=False) for p in paths]
    return {"z0": torch.cat([s["z0"] for s in shards]), "zc": torch.cat([s["zc"] for s in shards]),
            "cover": torch.cat([s["cover"] for s in shards]), "prompts": [p for s in shards for p in s["prompts"]]}


#: The demo checkpoint's own generation defaults (``transfer_defaults.json``; a flag or spec field overrides them):
#: its training clip length, and the steps / guidance that measured best (benchmarks/quality.py).
DEMO_DEFAULTS = {"num_frames_per_chunk": 9, "num_steps": 20, "guidance": 1.0, "resolution": "64"}


def export(args) -> None:
    """The trained models in the diffusers layout at ``--out`` (written beside it, then moved into place): the
    dit stage's transformer, edge ControlNet and T5 (or those of ``--snapshot``), the vae stage's VAE (with its
    latent statistics), the demo's word-level tokenizer, the Transfer2.5 scheduler, the checkpoint's defaults and a training record."""
    import shutil

    from diffusers import CosmosControlNetModel, CosmosTransformer3DModel, UniPCMultistepScheduler

    from configs.models import TRANSFER25_SCHEDULER
    source = args.work / args.dit_name / ("state.pt" if args.snapshot is None else f"snapshots/{args.snapshot}.pt")
    data = torch.load(source, map_location="cpu", weights_only=False)
    out = args.out.resolve()
    staging = out.parent / f".{out.name}.export"
    shutil.rmtree(staging, ignore_errors=True)
    demo_tokenizer().save_pretrained(staging / "tokenizer")
    t_cfg, c_cfg = demo_dit_configs(stage_patch(args.work, args.dit_name, None))
    for name, model, folder in (("text_encoder", demo_text_model(), "text_encoder"),
                                ("transformer", CosmosTransformer3DModel(**t_cfg), "transformer"),
                                ("controlnet", CosmosControlNetModel(**c_cfg), "controlnet/edge")):
        model.load_state_dict(data["models"][name])
        model.save_pretrained(staging / folder, safe_serialization=True)
    load_vae(args.work).save_pretrained(staging / "vae", safe_serialization=True)
    UniPCMultistepScheduler(**TRANSFER25_SCHEDULER).save_pretrained(staging / "scheduler")
    (staging / "transfer_defaults.json").write_text(json.dumps(DEMO_DEFAULTS, indent=2) + "\n")
    record = {"seed": args.seed, "command": "scripts/train_demo.py"}
    for stage, folder in (("vae", "vae"), ("dit", args.dit_name)):
        rows = [json.loads(line) for line in (args.work / folder / "log.jsonl").read_text().splitlines()]
        last = [r for r in rows if stage == "vae" or r["step"] <= data["step"]][-1]
        record[stage] = ({"from": last["from"]} if "from" in last  # --stage vae_from: not trained here
                         else {"steps": last["step"], "final_loss": round(last["loss"], 4)})
        if stage == "dit" and folder != "dit":
            record[stage]["folder"] = folder
        if stage == "dit" and "init_from" in json.loads((args.work / folder / "model.json").read_text()):
            record[stage]["fine_tuned_from"] = json.loads((args.work / folder / "model.json").read_text())["init_from"]
    (staging / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    print(f"exported the demo checkpoint to {out}")


def curve(args) -> None:
    """The loss curves of ``--work`` as a markdown table: mean loss per ``--every`` steps (default 400) and minutes."""
    every = args.every
    print("| stage | steps | mean loss over the last %d steps | minutes |\n|---|---:|---:|---:|" % every)
    for stage in ("vae", "dit"):
        path = args.work / stage / "log.jsonl"
        if not path.is_file():
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        minutes = 0.0
        for start in range(0, len(rows), every):
            part = rows[start:start + every]
            minutes += sum(b["minutes"] - a["minutes"] for a, b in zip(part, part[1:]) if b["minutes"] > a["minutes"])
            loss = sum(r["loss"] for r in part) / len(part)
            print(f"| {stage} | {part[-1]['step']} | {loss:.4f} | {minutes:.0f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="training folder (checkpoints and loss logs per stage)")
    p.add_argument("--stage", choices=("vae", "vae_from", "corpus", "dit", "export", "curve"), required=True)
    p.add_argument("--steps", type=int, help="train until this many steps in all (resumes; the lr schedule follows it)")
    p.add_argument("--stop_at", type=int, help="stop after this step, as an interrupted run would (resume with --steps)")
    p.add_argument("--out", type=Path, help="export: the checkpoint folder to write (default: the shipped demo/checkpoint)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save_every", type=int, default=50)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu",
                   help="vae, dit: where to train (default: cpu; e.g. cuda: float32, not bit-identical to the CPU)")
    p.add_argument("--every", type=int, default=400, help="curve: steps per row (default: 400)")
    p.add_argument("--keep_every", type=int, help="dit: also keep the models every this many steps (snapshots/)")
    p.add_argument("--snapshot", type=int, help="export: the models kept at this step instead of the last state")
    p.add_argument("--dit_name", default="dit",
                   help="dit, export: the dit stage's folder in --work (default: dit; another name: a second run)")
    p.add_argument("--init", help="dit: start a fresh stage's models from this stage folder's state (a fine-tune)")
    p.add_argument("--image_steps", type=int, default=0,
                   help="dit: train the first this many steps on single frames (a per-frame phase; default: 0)")
    p.add_argument("--image_batch", type=int, default=16, help="dit: frames per step in the per-frame phase")
    p.add_argument("--patch", type=int, choices=(1, 2),
                   help="dit: spatial patch in latent cells, fixed when the stage starts (default: 2)")
    p.add_argument("--shape_weight", type=float, default=0.0,
                   help="dit: loss weight 1 + this x the shapes' coverage of each latent cell (default: 0, uniform)")
    p.add_argument("--clips", type=int, default=20480, help="corpus: clips to encode (default: 20480, 20 shards)")
    p.add_argument("--shard", type=int, default=1024, help="corpus: clips per shard file (default: 1024)")
    p.add_argument("--corpus", action="store_true", help="dit: draw batches from the corpus (--stage corpus first)")
    p.add_argument("--compile", action="store_true", help="dit: torch.compile each DiT and ControlNet block")
    p.add_argument("--init_from", type=Path,
                   help="dit: start a fresh stage from an exported checkpoint's DiT, ControlNet and T5 (a fine-tune)")
    p.add_argument("--prompt_dropout", type=float, default=0.1,
                   help="dit: share of clips trained on the negative prompt instead of theirs (default: 0.1)")
    args = p.parse_args(argv)
    if args.stage in ("vae", "dit") and args.steps is None:
        p.error(f"--stage {args.stage} needs --steps")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this machine has no CUDA device torch can use")
    if args.out is None:
        args.out = DEMO_CHECKPOINT
    if args.threads:
        torch.set_num_threads(args.threads)
    stages = {"vae": train_vae, "vae_from": vae_from, "corpus": build_corpus, "dit": train_dit, "export": export,
              "curve": curve}
    stages[args.stage](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
