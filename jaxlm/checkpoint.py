"""One Orbax CheckpointManager: async saves, keep-N, resume, and params-only restore for eval.

A checkpoint holds three items: `params`, `train_state` (optimizer state and step) and a JSON
`meta` (model config, tokenizer hash). Keeping the parameters apart lets the eval program restore
them alone, straight into their sharded layout, without reading the optimizer state. Restores
are checked against the expected shapes first, so a checkpoint from another model gives an error
naming the parameters instead of a crash; nothing on disk is modified by a failed restore.

Damage: once a save has finished, jaxlm writes STEP/jaxlm_manifest.json (every file and its
size). `latest_complete_step` checks the newest steps against it before a run resumes: a
truncated or missing file names the step and file, and the run resumes from the newest complete
step (the damaged ones are moved aside to STEP.damaged) or is refused when there is none.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxlm import monitor, storage
from jaxlm.sharding import path_name

MANIFEST = "jaxlm_manifest.json"
_TMP_MARK = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the directory and the fix."""


@functools.cache
def _save_replicas_whole() -> None:
    """In a single process, Orbax saves replicated arrays whole instead of replica-parallel.

    Replica-parallel saving splits a replicated array's write among the processes that hold a
    copy, which only pays when those are different hosts. In one process it compiles a
    `jit(slice)` for every (shape, replica slice) of the state: 56 compiles in a small seq2seq
    run, more time than the save itself.
    """
    if jax.process_count() > 1:
        return
    # The default handler's metadata store (it records e.g. typed PRNG keys' impl) is kept.
    from orbax.checkpoint._src.metadata import array_metadata_store

    handler = ocp.type_handlers.ArrayHandler(
        use_replica_parallel=False, array_metadata_store=array_metadata_store.Store()
    )
    absl_logger = logging.getLogger("absl")  # Orbax warns of every override it is asked for
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
        absl_logger.setLevel(level)


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        _save_replicas_whole()
        # epath: the same code for local paths and gs:// (pods need storage every host sees).
        self.directory = epath.Path(directory)
        if not storage.is_remote(str(directory)):
            self.directory = epath.Path(Path(directory).absolute())
        self._pending: int | None = None  # a save started but not known to be finished
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
        self.wait()  # Orbax waits for the previous save anyway; this also writes its manifest
        rest = {k: v for k, v in state.items() if k != "params"}
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            train_state=ocp.args.StandardSave(rest),
            meta=ocp.args.JsonSave(meta),
        )
        try:
            started = self.manager.save(step, args=args, force=True)
        except Exception as e:  # noqa: BLE001 - disk full, permissions, quota: any backend
            raise self._save_error(step, e) from None
        self._pending = step if started else None
        return started

    def wait(self) -> None:
        """Wait for the save in flight, then record its files (see latest_complete_step)."""
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
            if step is not None and jax.process_index() == 0:
                write_manifest(self.directory / str(step))
        except Exception as e:  # noqa: BLE001 - an async save's error surfaces here
            raise self._save_error(step, e) from None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()

    def _save_error(self, step: int | None, e: Exception) -> CheckpointError:
        kept = [s for s in self.manager.all_steps() if s != step]
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        return CheckpointError(
            f"saving checkpoint step {step} in {self.directory} failed: {first}; the last "
            f"complete checkpoint (step {max(kept) if kept else 'none'}) is kept: free space or "
            "fix permissions, then re-run the same command to resume"
        )

    def latest_complete_step(self) -> int | None:
        """The newest step whose files match its manifest, for the trainer holding the workdir
        lock; newer damaged steps are named and moved aside (STEP.damaged), unfinished saves
        removed. Refuses when every step is damaged: never a silent restart from step 0 over
        existing checkpoints."""
        if jax.process_index() == 0:  # here, not in __init__: jaxlm-eval may run beside a save
            _remove_unfinished_saves(self.directory)
        steps = sorted(self.manager.all_steps(), reverse=True)
        damaged = []
        for step in steps:
            problem = find_damage(self.directory / str(step))
            if problem is None:
                break
            damaged.append((step, problem))
        else:
            if damaged:
                listed = ", ".join(f"step {n}: {problem}" for n, problem in damaged[:3])
                raise CheckpointError(
                    f"no complete checkpoint in {self.directory} ({listed}): put the files back "
                    f"from a copy, or move {self.directory} aside to start again from step 0"
                )
            return None
        if damaged:
            _sync("jaxlm_damaged_checkpoints_checked")  # all hosts decide before one moves them
        for bad, problem in damaged:
            target = _aside(self.directory, bad)
            monitor.console(
                f"checkpoint step {bad} in {self.directory} is damaged ({problem}): moved to "
                f"{target.name}; resuming from step {step}, the newest complete checkpoint"
            )
            if jax.process_index() == 0:
                (self.directory / str(bad)).rename(target)
        if damaged:
            _sync("jaxlm_damaged_checkpoints_moved")
            self.manager.reload()
        return step

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


def open_step(directory: str, step: int | None, workdir: str | Path) -> tuple[Checkpointer, int]:
    """A run's checkpointer and the step to restore (the latest when None), checked; `workdir`
    is only named in the error."""
    directory = epath.Path(directory)
    steps = []
    if directory.is_dir():
        ckpt = Checkpointer(directory)
        steps = ckpt.all_steps()
    if not steps:
        raise CheckpointError(
            f"no checkpoint in {directory}; train first (jaxlm-train --workdir {workdir}) "
            "or pass the --workdir of a trained run"
        )
    if step is None:
        return ckpt, max(steps)
    if step not in steps:
        ckpt.close()
        raise CheckpointError(
            f"no checkpoint for step {step} in {directory}; available steps: {sorted(steps)}"
        )
    return ckpt, step


def write_manifest(step_dir: epath.Path) -> None:
    """STEP/jaxlm_manifest.json: every file of a finished save and its size."""
    files = {
        str(p.relative_to(step_dir)): p.stat().length
        for p in _files(step_dir)
        if p.name != MANIFEST
    }
    text = json.dumps({"files": files, "written": time.time()}, sort_keys=True)
    tmp = step_dir / (MANIFEST + ".tmp")
    tmp.write_text(text)
    tmp.replace(step_dir / MANIFEST)  # atomic: a kill never leaves half a manifest


def _files(directory: epath.Path):
    """Every file below `directory` (epath has no recursive glob on gs://)."""
    for p in directory.iterdir():
        if p.is_dir():
            yield from _files(p)
        else:
            yield p


def find_damage(step_dir: epath.Path) -> str | None:
    """What is wrong with a saved step ("FILE is missing", "FILE has N bytes of M"), or None.

    Steps without a manifest (written by an older jaxlm, or killed between the save and its
    manifest) are checked only for their items."""
    for item in ("params", "train_state", "meta"):
        if not (step_dir / item).is_dir():
            return f"{item}/ is missing"
    try:
        files = json.loads((step_dir / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return None
    for name, size in sorted(files.items()):
        path = step_dir / name
        if not path.is_file():
            return f"{name} is missing"
        actual = path.stat().length
        if actual != size:
            return f"{name} has {actual} bytes of {size}"
    return None


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _aside(directory: epath.Path, step: int) -> epath.Path:
    """STEP.damaged (STEP.damaged.N when an earlier one is there): Orbax ignores such names."""
    target, n = directory / f"{step}.damaged", 1
    while target.exists():
        target, n = directory / f"{step}.damaged.{n}", n + 1
    return target


def _remove_unfinished_saves(directory: epath.Path) -> None:
    """A save interrupted by a kill leaves STEP.orbax-checkpoint-tmp-*: say so in one line (Orbax
    would remove it with its own warning)."""
    if not directory.is_dir():
        return
    for p in sorted(directory.iterdir()):
        if _TMP_MARK in p.name:
            monitor.console(
                f"removing {p}: an unfinished save of step {p.name.split('.')[0]} (the run "
                "was stopped while saving); resuming from the newest complete checkpoint"
            )
            try:
                p.rmtree()
            except OSError:
                pass  # still being written by a dying save in this process: Orbax retries


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
