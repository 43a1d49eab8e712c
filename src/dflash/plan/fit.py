"""What a drafter must match in its target: its feature layers and its mask id. One rule for the phase check
(`dflash.plan.config`, at plan time), the stage runner (once the target is built) and loading a drafter
(`dflash.modeling.drafter`); this module imports nothing, so loading a drafter needs neither jsonschema nor the
stage table."""

from __future__ import annotations


def layer_ids_problem(ids: list[int], layers: int | None) -> str | None:
    """Why feature layers `ids` do not fit an `layers`-layer target, or None. The last layer (layers - 1) is refused:
    training reads each feature layer's decoder output (a forward hook, before the final norm), while for the last
    layer HF's `output_hidden_states` (the bench engines, z-lab's loop) and SGLang give the state after the final
    norm, so a drafter trained on it would be served a different tensor; z-lab's layer rule never picks it."""
    if layers is None:
        return None
    if len(set(ids)) != len(ids) or max(ids) >= layers:
        return f"{ids} must be distinct layers of the {layers}-layer target"
    if max(ids) == layers - 1:
        return (f"{ids} include layer {layers - 1}, the target's last: training reads it before the final norm, HF's "
                f"output_hidden_states and SGLang after it (z-lab's layer rule never picks it); use layers below "
                f"{layers - 1}")
    return None


def mask_id_problem(mask_id: int, rows: int | None) -> str | None:
    """Why `mask_id` is not a row of a target embedding of `rows` rows, or None (also None where `rows` is unknown)."""
    if rows is not None and not 0 <= mask_id < rows:
        return f"{mask_id} is outside the target's {rows} embedding rows (ids 0..{rows - 1})"
    return None
