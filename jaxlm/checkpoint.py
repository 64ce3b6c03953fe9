"""One Orbax CheckpointManager: async saves, keep-N, resume, and params-only restore for eval.

A checkpoint holds three items: `params`, `train_state` (optimizer state and step) and a JSON
`meta` (model config, tokenizer hash). Keeping the parameters apart lets the eval program restore
them alone, straight into their sharded layout, without reading the optimizer state. Restores
are checked against the expected shapes first, so a checkpoint from another model gives an error
naming the parameters instead of a crash; nothing on disk is modified by a failed restore.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxlm import storage
from jaxlm.sharding import path_name


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the directory and the fix."""


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        # epath: the same code for local paths and gs:// (pods need storage every host sees).
        self.directory = epath.Path(directory)
        if not storage.is_remote(str(directory)):
            self.directory = epath.Path(Path(directory).absolute())
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        # Registering the handlers lets item_metadata read a checkpoint before restoring it.
        handlers = {
            "params": ocp.StandardCheckpointHandler(),
            "train_state": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        }
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=tuple(handlers), item_handlers=handlers, options=options
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, meta: dict) -> bool:
        """Start an async save of `state` at `step`; False when that step is already saved."""
        if step in self.manager.all_steps():
            return False
        rest = {k: v for k, v in state.items() if k != "params"}
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            train_state=ocp.args.StandardSave(rest),
            meta=ocp.args.JsonSave(meta),
        )
        return self.manager.save(step, args=args, force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def read_meta(self, step: int) -> dict:
        path = self.directory / str(step) / "meta" / "metadata"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} has no readable meta ({e}); it is "
                "corrupt or not a jaxlm checkpoint: move it aside or use another --workdir"
            ) from None

    def restore(self, step: int, abstract_state: dict, expect_meta: dict | None = None) -> dict:
        """Restore the whole train state (ShapeDtypeStructs with shardings) at `step`, checked."""
        rest = {k: v for k, v in abstract_state.items() if k != "params"}
        items = self._restore(
            step, {"params": abstract_state["params"], "train_state": rest}, expect_meta
        )
        return {"params": items["params"], **items["train_state"]}

    def restore_params(self, step: int, abstract_params, expect_meta: dict | None = None):
        """Restore only the parameters, directly into the shardings of `abstract_params`."""
        return self._restore(step, {"params": abstract_params}, expect_meta)["params"]

    def _restore(self, step: int, abstract_items: dict, expect_meta: dict | None) -> dict:
        where = self.directory / str(step)
        if step not in self.manager.all_steps():
            raise CheckpointError(
                f"no checkpoint for step {step} in {self.directory}; "
                f"available steps: {self.all_steps()}"
            )
        meta = self.read_meta(step)
        if expect_meta is not None:
            _compare_meta(meta, expect_meta, where)
        try:
            stored = self.manager.item_metadata(step)
            if stored.get("params") is None and (where / "state").exists():
                raise CheckpointError(
                    f"checkpoint {where} was written by jaxlm before 2026-11-23 (one 'state' "
                    "item, not params/train_state): resume it with that version or start a new "
                    "--workdir"
                )
            for name, abstract in abstract_items.items():
                tree = getattr(stored[name], "tree", stored[name])
                _compare_shapes(tree, abstract, where / name)
            args = {k: ocp.args.StandardRestore(v) for k, v in abstract_items.items()}
            restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        except CheckpointError:
            raise
        except Exception as e:  # Orbax raises many types for unreadable data
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"checkpoint {where} could not be read ({first}); it may be corrupt: "
                "move it aside to resume from an earlier step, or use another --workdir"
            ) from None
        return {k: restored[k] for k in abstract_items}


def _flat_shapes(tree) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_name(p): tuple(getattr(leaf, "shape", ())) for p, leaf in leaves}


def _compare_shapes(stored_tree, abstract_state, where: Path) -> None:
    stored = _flat_shapes(stored_tree)
    expected = _flat_shapes(abstract_state)
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    wrong = sorted(k for k in set(expected) & set(stored) if stored[k] != expected[k])
    if not (missing or extra or wrong):
        return
    details = [f"{k}: checkpoint {stored[k]} vs model {expected[k]}" for k in wrong[:3]]
    details += [f"missing {k}" for k in missing[:3]] + [f"unexpected {k}" for k in extra[:3]]
    raise CheckpointError(
        f"checkpoint {where} does not match this model ({'; '.join(details)}); "
        "restore with the config it was trained with or use a new --workdir"
    )


def _compare_meta(meta: dict, expect: dict, where: Path) -> None:
    for key in sorted(expect):
        if key in meta and meta[key] != expect[key]:
            if isinstance(meta[key], dict) and isinstance(expect[key], dict):
                # A field the checkpoint lacks was added to jaxlm after it was written: its
                # default then described the checkpoint, and the shape check still applies.
                diff = [
                    k
                    for k in sorted(expect[key])
                    if k in meta[key] and meta[key][k] != expect[key][k]
                ]
                shown = ", ".join(
                    f"{key}.{k}={meta[key].get(k)!r} (config has {expect[key][k]!r})"
                    for k in diff[:4]
                )
            else:
                shown = f"{key}={meta[key]!r} (config has {expect[key]!r})"
            if not shown:
                continue
            raise CheckpointError(
                f"checkpoint {where} was written with {shown}; "
                "restore with the same settings or use a new --workdir"
            )
