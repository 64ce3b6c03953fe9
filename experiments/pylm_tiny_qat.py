"""pylm_tiny_qat: quantization-aware fine-tuning of pylm_tiny, then int8 weight quantization.

The pylm_tiny model continues from a trained run with train.qat: every block matmul sees its
input rounded through int8 per token and its kernel per output channel (straight-through
gradients), the grid `jaxlm-compress quantize --bits 8` stores the kernel on.

Commands:  jaxlm-train --config experiments/pylm_tiny.py --workdir runs/pylm300      (make demo)
           jaxlm-train --config experiments/pylm_tiny_qat.py --workdir runs/pylm300_qat
           jaxlm-compress quantize --workdir runs/pylm300_qat --out runs/pylm300_qat_int8 --bits 8
           jaxlm-eval --workdir runs/pylm300_qat_int8 --max_batches 0
Hardware:  a 2-core CPU, no accelerator, shared with other runs.
Result:    2026-12-02, from the 300-step run (1.79663 bits/byte): 1.7763 bits/byte after 60 QAT
           steps (its eval runs with int8 weights and activations), 1.77623 as an int8 run; the
           same steps with --config.train.qat=False: 1.77623 fp32, 1.77622 int8. 197 s vs 161 s.
"""

from pathlib import Path

from jaxlm.config import load_config


def get_config():
    c = load_config(Path(__file__).with_name("pylm_tiny.py"))
    c.train.init_from = "runs/pylm300"
    c.train.qat = True
    c.train.steps = 60
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 5
    c.train.eval_every = 0
    c.train.checkpoint_every = 60
    c.train.log_every = 20
    return c
