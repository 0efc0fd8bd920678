"""ZeRO optimizer state that survives a change of world size.

ZeRO 1/2 partition the optimizer state (SGD's momentum, Adam's moments) over the data-parallel ranks, and
DeepSpeed 0.19 cannot load those partitions into another world size: its engine refuses the DP-size
change, and its universal-checkpoint converter (``deepspeed.checkpoint.ds_to_universal``) knows only
Adam's ``exp_avg``/``exp_avg_sq`` (SGD's ``momentum_buffer``, MoCo's optimizer, fails with a KeyError).
So every ZeRO checkpoint also carries each parameter's *full* optimizer state, assembled with DeepSpeed's
``safe_get_full_optimizer_state``; a resume on another world size loads the module, LR schedule and
step counter through ``load_checkpoint`` and puts the full state back with ``safe_set_full_optimizer_state``,
which re-partitions it for the new world. It costs one all-reduce per parameter per checkpoint and the
optimizer state's size once more on disk.
"""

from __future__ import annotations

from typing import Any

import torch


def gather_full_optimizer_state(engine) -> dict[str, Any] | None:
    """Every trainable parameter's full optimizer state (on the CPU); None without ZeRO.

    A collective: every rank must call it, in the same order. ``{}`` before the first optimizer step.
    """
    if engine.zero_optimization_stage() == 0:
        return None
    from deepspeed.utils import safe_get_full_optimizer_state

    states = [state for state in engine.optimizer.optimizer.state.values() if state]
    if not states:
        return {}
    per_element = [k for k, v in states[0].items() if torch.is_tensor(v) and v.dim() > 0]
    scalars = {k: v for k, v in states[0].items() if k not in per_element}  # e.g. Adam's step
    params = {
        name: {key: safe_get_full_optimizer_state(p, key).cpu() for key in per_element}
        for name, p in engine.module.named_parameters()
        if p.requires_grad
    }
    return {"params": params, "scalars": scalars}


def restore_full_optimizer_state(engine, saved: dict[str, Any]) -> None:
    """Put :func:`gather_full_optimizer_state`'s result back into a ZeRO engine of any world size."""
    if not saved:
        return  # saved before the first step: nothing to restore
    from deepspeed.utils import safe_set_full_optimizer_state

    zero, keys = engine.optimizer, next(iter(saved["params"].values())).keys()
    for group in zero.optimizer.param_groups:
        for flat in group["params"]:
            zero.optimizer.state[flat] = {key: torch.zeros_like(flat) for key in keys} | dict(
                saved["scalars"]
            )
    zero._hp_optimizer_states_linked = False  # link every parameter's fragment to the new state
    zero._lazy_init_hp_params_optimizer_state()
    for name, p in engine.module.named_parameters():
        for key, value in saved["params"].get(name, {}).items():
            safe_set_full_optimizer_state(p, value.to(p.device), key)
