"""gpt2_124m: GPT-2 small (12 layers, d=768, 12 heads, T=1024, vocab 50304), bf16 on one GPU.

Command:   jaxlm-bench --config experiments/gpt2_124m.py --steps 40
           jaxlm-train --config experiments/gpt2_124m.py --workdir runs/gpt2_124m
Hardware:  one NVIDIA H100 80GB (see README's benchmark table for the measured figures).
Data:      synthetic here; the data issue adds OpenWebText/C4 through TFDS.
Result:    throughput figures in README; no quality target yet (nanoGPT reaches ~2.85 val loss
           on OpenWebText after 600k steps of 0.5M tokens).
"""

from jaxlm.config import base_config, gpt2_style


def get_config():
    c = base_config()
    gpt2_style(c.model)
    c.model.vocab_size = 50304  # GPT-2's 50257 padded to a multiple of 128 for the matmuls
    c.model.d_model = 768
    c.model.num_layers = 12
    c.model.num_heads = 12
    c.model.d_ff = 3072
    c.model.max_len = 1024
    c.model.dtype = "bfloat16"
    c.model.attention_impl = "cudnn"
    c.data.source = "synthetic"
    c.data.batch_size = 16
    c.data.seq_len = 1024
    c.optim.lr = 6e-4
    c.optim.warmup_steps = 700
    c.optim.min_lr_ratio = 0.1
    c.optim.b2 = 0.95
    c.train.steps = 10000
    c.train.log_every = 100
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    return c
