"""pylm_tiny: a small LLaMA-style model on the embedded Python standard-library corpus.

Command:   make demo   (= jaxlm-train --config experiments/pylm_tiny.py --workdir runs/demo)
Hardware:  a 2-core CPU, no accelerator.
Wall time: TBD
Result:    TBD
"""

from jaxlm.config import base_config


def get_config():
    c = base_config()
    c.model.d_model = 128
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.d_ff = 512
    c.model.max_len = 128
    c.data.seq_len = 128
    c.data.batch_size = 32
    c.data.tokenizer_vocab_size = 2048
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 50
    c.train.steps = 600
    c.train.log_every = 50
    c.train.eval_every = 300
    c.train.eval_steps = 0
    c.train.checkpoint_every = 300
    return c
