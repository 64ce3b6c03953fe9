"""Where metrics go: the console, DIR/metrics.jsonl and TensorBoard (DIR/tensorboard).

Only process 0 writes. Records are flat dicts such as {"step": 100, "train/loss": 3.2}.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import jax


class WriteError(RuntimeError):
    """A metrics write failed (disk full, permission denied, quota); names the path and the fix."""


class MetricsWriter:
    """Appends records; `resume(step)` first drops what a killed run logged past its checkpoint."""

    def __init__(
        self,
        workdir: str | Path,
        jsonl_name: str = "metrics.jsonl",
        tensorboard_dir: str = "tensorboard",
    ):
        self.enabled = jax.process_index() == 0
        self.path = Path(workdir) / jsonl_name
        self._tb_dir = Path(workdir) / tensorboard_dir
        self._tb = None

    def resume(self, step: int, eval_again: bool = False) -> int:
        """Keep only whole lines of steps <= `step` (the checkpoint the run resumes from), so each
        step is logged once, and not the eval at `step` if `eval_again` (a finished run re-run
        evaluates its last step again); returns how many lines were dropped. TensorBoard is
        told to purge the events past `step` the same way."""
        if not self.enabled:
            return 0
        self._open_tensorboard(purge_step=step + 1 if step > 0 else None)
        if not self.path.is_file():
            return 0
        lines = self.path.read_bytes().split(b"\n")
        kept = [x for x in lines[:-1] if _keep(_parse(x), step, eval_again)]
        dropped = len(lines) - 1 - len(kept) + (1 if lines[-1] else 0)
        if dropped:
            # Written aside and renamed: a kill or a full disk here leaves the old file whole.
            tmp = self.path.with_name(self.path.name + ".tmp")
            try:
                tmp.write_bytes(b"".join(x + b"\n" for x in kept))
                os.replace(tmp, self.path)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise _write_error(self.path, e) from None
            console(
                f"{self.path}: dropped {dropped} lines past step {step}, logged by the "
                "interrupted run"
            )
        return dropped

    def write(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in record.items()}}
        line = (json.dumps(record) + "\n").encode()
        try:
            _append_whole(self.path, line)
        except OSError as e:
            raise _write_error(self.path, e) from None
        tb = self._open_tensorboard()
        try:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    tb.add_scalar(key, value, step)
            tb.flush()
        except OSError as e:
            raise _write_error(self._tb_dir, e) from None

    def _open_tensorboard(self, purge_step: int | None = None):
        if self._tb is None:
            try:
                self._tb = _summary_writer()(str(self._tb_dir), purge_step=purge_step)
            except OSError as e:
                raise _write_error(self._tb_dir, e) from None
        return self._tb

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _summary_writer():
    """tensorboardX's SummaryWriter, imported on first use (only process 0 writes events).

    tensorboardX imports torch whenever it is installed, only to accept torch tensors as
    values: 2-4 s of every training start on a machine with torch. jaxlm writes floats, so torch
    is hidden from that import (a later `import torch` in the process works as usual).
    """
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX allows
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def _append_whole(path: Path, data: bytes) -> None:
    """Append `data` whole or not at all: unbuffered (a buffered file's truncate flushes the
    rest of the line first, and fails again on a full disk), and a partial write is cut off
    again, so readers and `resume` only ever see whole records."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            done = 0
            while done < len(data):
                done += os.write(fd, data[done:])
        except OSError:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def _parse(line: bytes) -> dict | None:
    """One JSONL record, or None for a damaged line."""
    try:
        record = json.loads(line)
        int(record["step"])
        return record
    except (ValueError, KeyError, TypeError):
        return None


def _keep(record: dict | None, step: int, eval_again: bool) -> bool:
    if record is None or int(record["step"]) > step:
        return False
    is_eval = any(k.startswith("eval/") for k in record)
    return not (eval_again and is_eval and int(record["step"]) == step)


def _write_error(path: Path, e: OSError) -> WriteError:
    reason = e.strerror or str(e)
    return WriteError(
        f"could not write {path}: {reason} (errno {e.errno}); the run stopped and its last "
        "complete checkpoint is kept: free space or fix permissions, then re-run the same "
        "command to resume"
    )


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    return value


def console(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stdout, flush=True)


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def progress_line(step: int, total: int, record: dict, eta_s: float | None) -> str:
    parts = [f"step {step}/{total}", f"loss {record['train/loss']:.4f}"]
    parts.append(f"lr {record['train/lr']:.2e}")
    parts.append(f"{record['tokens_per_sec'] / 1e3:.1f}k tok/s")
    if "mfu" in record:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    if eta_s is not None:
        parts.append(f"ETA {format_duration(eta_s)}")
    return " | ".join(parts)


def eval_line(step: int, metrics: dict) -> str:
    """One console line of whatever the objective reports (see tasks.py)."""
    parts = [f"eval @ {step}: loss {metrics['loss']:.4f}"]
    formats = {
        "perplexity": "ppl {:.2f}",
        "bits_per_byte": "bits/byte {:.4f}",
        "accuracy": "accuracy {:.4f}",
        "macro_f1": "macro F1 {:.4f}",
        "tokens": "{:.0f} tokens",
        "examples": "{:.0f} examples",
        "bleu": "BLEU {:.2f}",
        "chrf": "chrF {:.1f}",
        "exact_match": "exact match {:.3f}",
    }
    parts += [fmt.format(metrics[key]) for key, fmt in formats.items() if key in metrics]
    return " | ".join(parts)
