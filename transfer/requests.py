"""The run's requests from its ``InputConfig``: cosmos-transfer1 specs and batches (``transfer.specs``) or
cosmos-transfer2.5 samples (``transfer.spec25``), each into the one ``Request`` model."""

from __future__ import annotations

from pathlib import Path

from transfer.config import InputConfig
from transfer.errors import TransferError
from transfer.specs import Request, check_name, load_batch, load_spec, parse_request


def requests_from(inputs: InputConfig, chunk_conditioning: str, failures: list | None = None) -> list[Request]:
    """The run's requests; for a batch with a ``failures`` list, bad lines land there instead of raising."""
    defaults = dict(inputs.defaults)
    if inputs.input_files:
        from transfer.spec25 import load_inputs

        def transfer1(obj, where, base_dir):
            return parse_request(obj, where=where, name=Path(where.split(":")[0]).stem, defaults=defaults,
                                 base_dir=base_dir)

        requests = load_inputs(list(inputs.input_files), flags=dict(inputs.sample_flags),
                               defaults=dict(inputs.sample_defaults), chunk_conditioning=chunk_conditioning,
                               parse_t1=transfer1)
        for request in requests:
            other = sorted(set(request.controls) - {inputs.model}) if inputs.model else []
            if other:
                raise TransferError(f"{request.source} ({request.name}): control {other[0]!r} but --model "
                                    f"{inputs.model}: drop --model to use every control the sample names")
        return requests
    from transfer.spec25 import parse_sample

    def transfer25(obj, where, base_dir):  # a Transfer2.5 sample given to the transfer1 flags: its fields, defaults
        return parse_sample(obj, where=where, base_dir=base_dir, flags={}, defaults=dict(inputs.sample_defaults),
                            chunk_conditioning=chunk_conditioning)

    if inputs.batch_input_path:
        return load_batch(inputs.batch_input_path, defaults=defaults, base_spec=inputs.controlnet_specs,
                          failures=failures, parse_other=transfer25)
    if not inputs.controlnet_specs:
        raise TransferError("give --controlnet_specs SPEC.json or --batch_input_path BATCH.jsonl (transfer1 form), or "
                            "-i SPEC.json (Transfer2.5 form)")
    return [load_spec(inputs.controlnet_specs, name=check_name(inputs.video_save_name, "--video_save_name"),
                      defaults=defaults, parse_other=transfer25)]
