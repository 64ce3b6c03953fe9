"""Where metrics go: the console, DIR/metrics.jsonl and TensorBoard (DIR/tensorboard).

Only process 0 writes. Records are flat dicts such as {"step": 100, "train/loss": 3.2}.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import jax


class MetricsWriter:
    def __init__(
        self,
        workdir: str | Path,
        jsonl_name: str = "metrics.jsonl",
        tensorboard_dir: str = "tensorboard",
    ):
        self.enabled = jax.process_index() == 0
        self.path = Path(workdir) / jsonl_name
        self._tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter  # imported here: only process 0 needs it

            self._tb = SummaryWriter(str(Path(workdir) / tensorboard_dir))

    def write(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in record.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(key, value, step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


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
