"""Run under torchrun (2 processes): one DiT + ControlNet step with sequence parallelism for each plan variant -- the
complete plan, then the plan missing a per-token input (temb, latents, rope), each on freshly built models. Prints
``<variant> OK <max |diff| vs one process>`` or ``<variant> ERROR <type>: <message>`` on rank 0. Used by
tests/test_sequence_parallel.py."""

import torch
import torch.distributed as dist
from diffusers import CosmosControlNetModel, CosmosTransformer3DModel

from configs.models import preset
from transfer.distributed import sequence_parallel

VARIANTS = {"none": (), "temb": ("temb", "embedded_timestep"), "latents": ("latents",), "rope": (0, 1)}
cfg = preset("tiny")
g = torch.Generator().manual_seed(1)
x, ctl = torch.randn(1, 16, 2, 4, 6, generator=g), torch.randn(1, 16, 2, 4, 6, generator=g)
ts, text = torch.rand(1, 1, 2, 1, 1, generator=g), torch.randn(1, 6, 32, generator=g)
ctx, cm, pm = (text, torch.zeros(1, 4, 24)), torch.zeros(1, 1, 2, 4, 6), torch.zeros(1, 1, 32, 48)


def models():
    torch.manual_seed(0)
    return CosmosTransformer3DModel(**cfg.transformer).eval(), CosmosControlNetModel(**cfg.controlnet).eval()


def step(dit, net):
    with torch.no_grad():
        res = net(controls_latents=ctl, latents=x, timestep=ts, encoder_hidden_states=ctx, condition_mask=cm,
                  conditioning_scale=1.0, padding_mask=pm, return_dict=False)[0]
        return dit(hidden_states=x, timestep=ts, encoder_hidden_states=ctx, block_controlnet_hidden_states=res,
                   condition_mask=cm, padding_mask=pm, return_dict=False)[0]


ref = step(*models())
dist.init_process_group("cpu:gloo")
meshes = sequence_parallel.branch_meshes([(0, 1)], "cpu")  # one mesh serves every variant's models
for name, dropped in VARIANTS.items():
    def plan(model, dropped=dropped):
        p = sequence_parallel.cp_plan(model)
        for entry in p.values():
            if isinstance(entry, dict):
                for key in dropped:
                    entry.pop(key, None)
        return p

    dit, net = models()
    sequence_parallel.enable({"transformer": dit, "controlnet": net}, meshes[(0, 1)], plan=plan)
    try:
        out = f"OK {(step(dit, net) - ref).abs().max().item()}"
    except Exception as e:  # noqa: BLE001 -- the probe reports any failure
        out = f"ERROR {type(e).__name__}: {str(e).splitlines()[0]}"
    if dist.get_rank() == 0:
        print(name, out, flush=True)
    dist.barrier()
