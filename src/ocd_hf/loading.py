"""Loading a saved head onto a model: find its files, read them, check the base layer, rebuild the head."""

from __future__ import annotations

import os
from typing import Any

from .conditioner import Conditioner, check_name
from .hub import resolve_head_files
from .integrations import get_adapter
from .serialization import build_head, check_base_layer, read_record, read_state_dict


def load_pretrained(
    model: Any,
    source: str | os.PathLike,
    *,
    allow_mismatch: bool = False,
    verify_checksum: bool = True,
    num_inference_steps: int | None = None,
    conditioner: Conditioner | None = None,
    **hub_kwargs: Any,
) -> dict[str, Any]:
    """The keyword arguments of `OCDWrapper(...)` for a head saved at `source` (a folder or a Hub id).

    Args:
        model: The base model the head was trained for.
        source: A local folder, or a Hub repo id (downloaded, or read from the cache when offline).
        allow_mismatch: Accept a target layer whose weights differ from the ones the head was trained on
            (same shape only); a warning says so.
        verify_checksum: Refuse `ocd_head.safetensors` when its sha256 differs from the one recorded in
            `ocd_state.json` at save. False loads the changed tensors anyway, with a warning.
        num_inference_steps: Overrides the stored number of DDIM steps.
        conditioner: The conditioner the head was trained with (`ocd_hf.conditioner`); None for the default
            mean pooling. A head saved with another conditioner's name is refused.
        **hub_kwargs: `revision`, `subfolder`, `token`, `cache_dir`, `force_download`, `local_files_only`.
    """
    files = resolve_head_files(source, **hub_kwargs)
    record = read_record(files.config, files.state)
    conditioner = check_name(record.provenance.conditioner, conditioner, files.where)
    if num_inference_steps is not None:
        record.config = record.config.replace(num_inference_steps=num_inference_steps)
    adapter = get_adapter(model)
    layer = check_base_layer(record, adapter, files.where, allow_mismatch=allow_mismatch)
    state = read_state_dict(files.head, record.head_sha256, verify_checksum=verify_checksum)
    head = build_head(record, state, files.where).to(layer.weight.device)
    return dict(
        model=model,
        config=record.config,
        adapter=adapter,
        head=head,
        shapes=record.shapes,
        provenance=record.provenance,
        state=record.fitted,
        conditioner=conditioner,
    )
