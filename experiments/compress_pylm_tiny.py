"""compress_pylm_tiny: distillation and pruning of the pylm_tiny demo model (issue 19, items 2, 4).

get_config() is the half-width student (d_model 64, d_ff 256, the teacher's 4 layers and
4/2 heads) distilled from runs/base, the 300-step `make demo` model (experiments/pylm_tiny.py).
Commands (2-core CPU shared with other jobs, jax 0.10.2; see README **Compression**):

  jaxlm-train --config experiments/pylm_tiny.py --workdir runs/base
  jaxlm-train --config experiments/compress_pylm_tiny.py --workdir runs/student_distilled
  jaxlm-train --config experiments/compress_pylm_tiny.py --workdir runs/student_scratch \\
      --config.train.distill.teacher=
  jaxlm-compress prune --workdir runs/base --out runs/wanda50 --method wanda --sparsity 0.5
  jaxlm-compress prune --workdir runs/base --out runs/mag50 --method magnitude --sparsity 0.5
  jaxlm-compress prune --workdir runs/base --out runs/wanda24 --method wanda --pattern 2:4
  jaxlm-compress prune --workdir runs/base --out runs/mag24 --method magnitude --pattern 2:4
  jaxlm-compress prune --workdir runs/base --out runs/struct25 --method wanda --neurons 0.25
  jaxlm-compress prune --workdir runs/base --out runs/heads50n25 --method wanda \\
      --heads 0.5 --neurons 0.25
  (and --method magnitude of both)
  jaxlm-train --config runs/wanda50/config.json --workdir runs/wanda50_ft \\
      --config.train.init_from=runs/wanda50 --config.train.steps=50 --config.optim.lr=1e-3 \\
      --config.optim.warmup_steps=5   (also mag50, and runs/base without masks as the control)
  jaxlm-eval --workdir runs/<each> --max_batches 0

Results (2026-12-02, validation bits per byte on the whole split; the CPU shared with five
other jobs; 150 student steps, half the teacher's, for time):
  dense 1.7966 (300 steps, 12.5 min); dense + 50 steps at lr 1e-3: 1.7768 (112 s)
  50% unstructured: magnitude 1.8148 -> 1.7812 after 50 steps; Wanda 1.8182 -> 1.7828
  2:4: magnitude 1.8425, Wanda 1.8469
  25% of neurons: magnitude 1.9010, Wanda 1.8107 (1,049,728 of 1,246,336 parameters)
  1 of 2 KV groups + 25% of neurons: magnitude 1.9612, Wanda 1.9413 (951,424 parameters)
  half-width student, 150 steps: scratch 2.2753 (217 s), distilled 2.2643 (388 s)
The same prune/quantize commands on the 1200-step run (--workdir runs/pylm_long, 1.3102;
2026-12-02, CPU otherwise idle): 50% magnitude 1.3828, Wanda 1.3723; 2:4 magnitude 1.4815,
Wanda 1.4581; int8 1.3102, int4 (groups of 128) 1.3198.
"""

from jaxlm.config import base_config

TEACHER = "runs/base"


def get_config():
    c = base_config()
    c.model.d_model = 64
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.d_ff = 256
    c.model.max_len = 128
    c.model.dtype = "float32"  # CPUs have no fast bf16 matmuls
    c.data.seq_len = 128
    c.data.batch_size = 32
    c.data.tokenizer = f"{TEACHER}/tokenizer.model"  # distillation needs the teacher's
    c.optim.lr = 5e-3
    c.optim.warmup_steps = 30
    c.train.steps = 150
    c.train.log_every = 50
    c.train.eval_every = 0
    c.train.eval_steps = 0
    c.train.checkpoint_every = 150
    c.train.distill.teacher = TEACHER
    c.train.distill.temperature = 2.0
    c.train.distill.alpha = 0.5
    return c
