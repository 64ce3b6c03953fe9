"""The Optax chain from config: warmup + decay schedule, global-norm clipping, masked AdamW.

Frozen parameters (train.freeze, see jaxlm/finetune.py) are routed around the whole chain: they
get zero updates, no Adam moments are allocated for them, and their gradients count neither in
the clipping norm nor in weight decay.
"""

from __future__ import annotations

import jax
import optax

from jaxlm.sharding import path_name


def learning_rate_schedule(optim, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine, linear or constant to `lr * min_lr_ratio`."""
    warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    final = optim.lr * optim.min_lr_ratio
    if optim.schedule == "cosine":
        decay = optax.cosine_decay_schedule(optim.lr, decay_steps, alpha=optim.min_lr_ratio)
    elif optim.schedule == "linear":
        decay = optax.linear_schedule(optim.lr, final, decay_steps)
    else:
        decay = optax.constant_schedule(optim.lr)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), decay], [warmup])


def weight_decay_mask(params, optim):
    """True where weight decay applies. Norm and embedding parameters are found by their path."""

    def decays(path, leaf) -> bool:
        name = path_name(path)
        parts = name.split("/")
        if any(p.endswith("norm") for p in parts):
            return optim.decay_norms
        if parts[0] in ("embed", "pos_embed", "type_embed"):
            return optim.decay_embeddings
        if parts[-1] == "bias":
            return optim.decay_biases
        return True

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(
    optim, total_steps: int, abstract_params, frozen=None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with the config's schedule, clipping and decay mask; returns (tx, schedule).

    `frozen`: a tree of bools like the parameters (finetune.freeze_mask); True leaves never move.
    """
    schedule = learning_rate_schedule(optim, total_steps)
    parts = []
    if optim.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim.clip_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=optim.b1,
            b2=optim.b2,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            mask=weight_decay_mask(abstract_params, optim),
        )
    )
    tx = optax.chain(*parts)
    if frozen is not None and any(jax.tree.leaves(frozen)):
        # Partitioning (not zeroing gradients around the chain) keeps frozen parameters out of
        # the optimizer state altogether: their moments are MaskedNodes, which have no leaves,
        # so the state is smaller and state_shardings/checkpoints see only trained parameters.
        # Nothing frozen keeps the plain chain, so its state layout matches older checkpoints.
        tx = optax.transforms.selective_transform(tx, freeze_mask=frozen)
    return tx, schedule
