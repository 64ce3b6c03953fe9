"""llama_1b: a LLaMA-style 1.1B model (TinyLlama shape: 22 layers, d=2048, 32 heads, 4 KV heads).

Command:   jaxlm-bench --config experiments/llama_1b.py --steps 20
Hardware:  one NVIDIA H100 80GB (see README's benchmark table for the measured figures).
Data:      synthetic; T=2048, vocab 32000.
Result:    throughput figures in README.
"""

from jaxlm.config import base_config


def get_config():
    c = base_config()
    c.model.vocab_size = 32000
    c.model.d_model = 2048
    c.model.num_layers = 22
    c.model.num_heads = 32
    c.model.num_kv_heads = 4
    c.model.d_ff = 5632
    c.model.max_len = 2048
    c.model.tie_embeddings = False
    c.model.dtype = "bfloat16"
    c.model.attention_impl = "cudnn"
    c.model.remat = "dots"
    c.data.source = "synthetic"
    c.data.batch_size = 8
    c.data.seq_len = 2048
    c.optim.lr = 4e-4
    c.optim.warmup_steps = 2000
    c.train.steps = 100000
    c.train.log_every = 50
    c.train.eval_every = 2000
    c.train.checkpoint_every = 1000
    return c
