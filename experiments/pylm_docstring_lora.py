"""pylm_docstring_lora: pylm_docstring's code-to-docstring fine-tune with LoRA adapters only.

The task, model and data are experiments/pylm_docstring.py's; the base run's parameters stay
frozen and only rank-8 adapters on the attention query and value kernels train (alpha 16, so a
scale of 2), at a higher learning rate as LoRA usually takes. Checkpoints hold the adapters
alone; jaxlm-eval and jaxlm-generate merge them into the base on load, and
`jaxlm-compress merge-lora` writes a plain run.

Commands:  jaxlm-train --config experiments/pylm_docstring_lora.py --workdir runs/docstring_lora
           jaxlm-eval --workdir runs/docstring_lora --max_batches 0
           jaxlm-compress merge-lora --workdir runs/docstring_lora --out runs/docstring_merged
Hardware:  a 2-core CPU, no accelerator, shared with other runs.
Result:    2026-12-02, from the 300-step pylm_tiny run (--config.train.init_from=runs/pylm300
           --config.train.steps=120 --config.train.eval_every=0 --config.optim.warmup_steps=15),
           all 164 validation pairs, greedy: 14,336 trainable parameters, loss 4.92, BLEU 0.32,
           chrF 12.5, checkpoint 265,525 bytes, 300 s; pylm_docstring.py with the same flags
           (full fine-tuning, 1,246,336 parameters): loss 4.35, BLEU 0.29, chrF 14.1,
           14,004,289 bytes, 367 s. See README "Compression".
"""

from pathlib import Path

from jaxlm.config import load_config


def get_config():
    c = load_config(Path(__file__).with_name("pylm_docstring.py"))
    c.train.lora_rank = 8
    c.train.lora_alpha = 16.0
    c.train.lora_targets = "attn/query,attn/value"
    c.optim.lr = 5e-3
    c.optim.weight_decay = 0.0
    return c
