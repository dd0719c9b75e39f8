"""Run under torchrun (2 processes): one DiT + ControlNet step with sequence parallelism, the plan possibly missing a
per-token input (``argv[1]``: none, temb, latents, rope). Prints ``OK <max |diff| vs one process>`` or ``ERROR <type>:
<message>`` on rank 0. Used by tests/test_sequence_parallel.py."""

import sys

import torch
import torch.distributed as dist
from diffusers import CosmosControlNetModel, CosmosTransformer3DModel

from configs.models import preset
from transfer.distributed import sequence_parallel

missing = sys.argv[1]
cfg = preset("tiny")
torch.manual_seed(0)
dit, net = CosmosTransformer3DModel(**cfg.transformer).eval(), CosmosControlNetModel(**cfg.controlnet).eval()
g = torch.Generator().manual_seed(1)
x, ctl = torch.randn(1, 16, 2, 4, 6, generator=g), torch.randn(1, 16, 2, 4, 6, generator=g)
ts, text = torch.rand(1, 1, 2, 1, 1, generator=g), torch.randn(1, 6, 32, generator=g)
ctx, cm, pm = (text, torch.zeros(1, 4, 24)), torch.zeros(1, 1, 2, 4, 6), torch.zeros(1, 1, 32, 48)


def step():
    with torch.no_grad():
        res = net(controls_latents=ctl, latents=x, timestep=ts, encoder_hidden_states=ctx, condition_mask=cm,
                  conditioning_scale=1.0, padding_mask=pm, return_dict=False)[0]
        return dit(hidden_states=x, timestep=ts, encoder_hidden_states=ctx, block_controlnet_hidden_states=res,
                   condition_mask=cm, padding_mask=pm, return_dict=False)[0]


def plan(model):
    p = sequence_parallel.cp_plan(model)
    for entry in p.values():
        if isinstance(entry, dict):
            for key in {"temb": ("temb", "embedded_timestep"), "latents": ("latents",), "rope": (0, 1)}.get(missing, ()):
                entry.pop(key, None)
    return p


ref = step()
dist.init_process_group("cpu:gloo")
branch = sequence_parallel.branch_meshes([(0, 1)], "cpu")[(0, 1)]
sequence_parallel.enable({"transformer": dit, "controlnet": net}, branch, plan=plan)
try:
    out = f"OK {(step() - ref).abs().max().item()}"
except Exception as e:  # noqa: BLE001 -- the probe reports any failure
    out = f"ERROR {type(e).__name__}: {str(e).splitlines()[0]}"
if dist.get_rank() == 0:
    print(out, flush=True)
