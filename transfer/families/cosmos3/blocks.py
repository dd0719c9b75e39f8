"""Cosmos 3 transfer cut at the stage boundaries this project places on ranks, each stage running diffusers' own
modular blocks (``Cosmos3OmniModularPipeline``'s transfer branch), so that the stages, run one after another in one
process, give diffusers' pipeline's output by construction, and each boundary is an explicit list of the state's
fields that cross it (what a stage process will send).

    text  (coordinator): chunk geometry and hint frames (setup), prompt token ids (no text encoder), text segments
    vae   per chunk: hint latents (ahead: they need no earlier chunk) and the seed from the previous chunk's decode
    dit   per chunk: noise, the packed [text | hints | target] sequences, the step loop (up to 3 passes a step)
    vae   per chunk: decode; the coordinator stitches the chunks

``run_staged`` (one process) runs each stage on its own state with only these fields passed, packed as a message
carries them, and equals the pipeline; the stage processes (``transfer.families.cosmos3.ranks``) send the same
fields between ranks.
"""

from __future__ import annotations

import json

import torch

#: Blocks of each stage, as paths in the transfer branch's execution blocks.
TEXT_BLOCKS = ("text_encoder.setup", "text_encoder.transfer_text", "denoise.prepare_text_segments")
ENCODE_BLOCKS = ("denoise.chunk_denoise.encode_transfer_chunk",)
DIT_BLOCKS = ("denoise.chunk_denoise.prepare_transfer_latents", "denoise.chunk_denoise.pack_transfer_sequence",
              "denoise.chunk_denoise.set_timesteps", "denoise.chunk_denoise.denoise")
DECODE_BLOCKS = ("denoise.chunk_denoise.decode_chunk",)
STITCH_BLOCKS = ("decode",)

#: The fields that cross each boundary (everything else a stage reads is the request's own settings, which every
#: rank holds).
TEXT_TO_VAE = ("height", "width", "control_frames", "total_frames", "chunk_frames", "num_chunks", "stride")
TEXT_TO_DIT = ("cond_text_segment", "uncond_text_segment")
VAE_TO_DIT = ("control_latents", "x0_tokens_vision", "current_conditional_frames")
DIT_TO_VAE = ("latents",)
VAE_TO_STITCH = ("output_chunks", "total_frames")


def hint_latents(pipe, state, chunk: int) -> list[torch.Tensor]:
    """Chunk ``chunk``'s hint latents from the state's ``control_frames``: the first half of diffusers'
    ``Cosmos3TransferChunkVaeEncoderStep`` (the window sliced and reflect-padded to a full chunk, each hint encoded),
    on its own so that a VAE rank outside the DiT group encodes chunk k+1's hints while the DiT denoises chunk k
    (they depend on no earlier chunk). Equal to the block's (tests/test_cosmos3_runs.py)."""
    chunk_frames, start = state.get("chunk_frames"), chunk * state.get("stride")
    end = min(start + chunk_frames, state.get("total_frames"))
    out = []
    for frames in state.get("control_frames").values():
        frames = frames[:, :, start:end]
        while frames.shape[2] < chunk_frames:
            pad = min(frames.shape[2] - 1, chunk_frames - frames.shape[2])
            if pad <= 0:
                frames = torch.cat([frames, frames[:, :, -1:].repeat(1, 1, chunk_frames - frames.shape[2], 1, 1)], 2)
                break
            frames = torch.cat([frames, frames.flip(dims=[2])[:, :, :pad]], dim=2)
        out.append(pipe._encode_video(frames).contiguous().float())
    return out


def seed_latents(pipe, state) -> None:
    """The block's second half for a later chunk (``chunk_id`` > 0, no first-chunk video): the target seeded with the
    previous decode's last ``num_conditional_frames`` frames, the rest repeating the last of them, encoded
    (``x0_tokens_vision``, ``current_conditional_frames``); the first chunk's target is zeros."""
    chunk_frames, previous = state.get("chunk_frames"), state.get("previous_output")
    vae = pipe.vae
    target = torch.zeros(1, 3, chunk_frames, state.get("height"), state.get("width"), device=vae.device,
                         dtype=vae.dtype)
    conditional = 0
    if state.get("chunk_id") > 0 and previous is not None:
        conditional = min(state.get("num_conditional_frames"), previous.shape[2], chunk_frames)
        if conditional > 0:
            target[:, :, :conditional] = previous[:, :, -conditional:].to(device=vae.device, dtype=vae.dtype)
    if 0 < conditional < chunk_frames:
        target[:, :, conditional:] = target[:, :, conditional - 1:conditional].expand(
            -1, -1, chunk_frames - conditional, -1, -1)
    state.set("x0_tokens_vision", pipe._encode_video(target).contiguous().float())
    state.set("current_conditional_frames", conditional)


def execution_blocks(pipe, control_videos: dict):
    """The transfer branch's blocks (diffusers picks it when ``control_videos`` is given), their step bars off (the
    callers show their own)."""
    blocks = pipe.blocks.get_execution_blocks(control_videos=control_videos)
    for block in blocks.sub_blocks.values():
        if hasattr(block, "set_progress_bar_config"):
            block.set_progress_bar_config(disable=True)
    return blocks


def block_at(blocks, path: str):
    """A block of the execution blocks, which diffusers names by its path (``denoise.chunk_denoise.denoise``)."""
    return blocks.sub_blocks[path]


def initial_state(blocks, inputs: dict):
    """A state holding the request's inputs and every other input's default, as ``ModularPipeline.__call__`` makes."""
    from diffusers.modular_pipelines import PipelineState

    state = PipelineState()
    for param in blocks.inputs:
        if param.name is None:
            continue
        state.set(param.name, inputs[param.name] if param.name in inputs else param.default, param.kwargs_type)
    return state


def run_blocks(pipe, blocks, paths, state):
    for path in paths:
        _, state = block_at(blocks, path)(pipe, state)
    return state


def pack_fields(state, names) -> tuple[dict, dict[str, torch.Tensor]]:
    """``names`` from a stage's state as a message: their structure (dicts, lists, ints, floats, strings) as JSON-able
    meta, their tensors named by path (``control_frames.edge``, ``control_latents.0``)."""
    tensors: dict[str, torch.Tensor] = {}

    def pack(value, path: str) -> dict:
        if isinstance(value, torch.Tensor):
            tensors[path] = value
            return {"tensor": path}
        if isinstance(value, dict):
            return {"dict": {str(k): pack(v, f"{path}.{k}") for k, v in value.items()}}
        if isinstance(value, (list, tuple)):
            return {"list": [pack(v, f"{path}.{i}") for i, v in enumerate(value)]}
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise TypeError(f"state field {path}: {type(value).__name__} cannot cross a stage boundary")
        return {"value": value}

    return {name: pack(state.get(name), name) for name in names}, tensors


def unpack_fields(meta: dict, tensors: dict[str, torch.Tensor], state) -> None:
    """The fields of ``pack_fields``' message into a stage's state."""

    def unpack(node: dict):
        if "tensor" in node:
            return tensors[node["tensor"]]
        if "dict" in node:
            return {k: unpack(v) for k, v in node["dict"].items()}
        if "list" in node:
            return [unpack(v) for v in node["list"]]
        return node["value"]

    for name, node in meta.items():
        state.set(name, unpack(node))


def copy_fields(source, target, names) -> None:
    """What a boundary carries: ``names`` from one stage's state into another's, as a message would (meta through
    JSON, tensors copied)."""
    meta, tensors = pack_fields(source, names)
    unpack_fields(json.loads(json.dumps(meta)), {k: t.clone() for k, t in tensors.items()}, target)


@torch.no_grad()
def run_staged(pipe, **inputs):
    """Cosmos 3 transfer with each stage on its own state, only the boundary fields passed between them; returns the
    stitched video as the pipeline's ``output_type`` gives it, and each chunk's denoised latents."""
    blocks = execution_blocks(pipe, inputs["control_videos"])
    text, vae, dit = (initial_state(blocks, inputs) for _ in range(3))
    text = run_blocks(pipe, blocks, TEXT_BLOCKS, text)
    copy_fields(text, vae, TEXT_TO_VAE)
    copy_fields(text, dit, TEXT_TO_DIT)
    vae.set("output_chunks", [])
    vae.set("previous_output", None)
    latents = []
    for chunk in range(text.get("num_chunks")):
        if chunk > 0:
            pipe.transformer._reset_stateful_cache()
        vae.set("chunk_id", chunk)
        dit.set("chunk_id", chunk)
        vae = run_blocks(pipe, blocks, ENCODE_BLOCKS, vae)
        copy_fields(vae, dit, VAE_TO_DIT)
        dit = run_blocks(pipe, blocks, DIT_BLOCKS, dit)
        copy_fields(dit, vae, DIT_TO_VAE)
        latents.append(vae.get("latents"))
        vae = run_blocks(pipe, blocks, DECODE_BLOCKS, vae)
    stitch = initial_state(blocks, inputs)
    copy_fields(vae, stitch, VAE_TO_STITCH)
    return run_blocks(pipe, blocks, STITCH_BLOCKS, stitch).get("videos"), latents
