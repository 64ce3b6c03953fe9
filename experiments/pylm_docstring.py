"""pylm_docstring: code to docstring with pylm_tiny's decoder fine-tuned as a prefix LM.

The task is t5_tiny's (`tfds:code_docstring`: a function's source without its docstring in,
the docstring's first sentence out; 6,131 train / 164 validation pairs, split by file as the
python_stdlib corpus is, so the pretrained model never saw a validation function). The model is
pylm_tiny's decoder (4 layers, d=128) with task.objective=seq2seq: each example is one causal
row, code (at most 96 tokens) + EOS + docstring (at most 32), with the loss on the docstring
only; it starts from runs/pylm_long (pylm_tiny trained 1200 steps) and takes its tokenizer.

Commands:  jaxlm-train --config experiments/pylm_tiny.py --workdir runs/pylm_long \
               --config.train.steps=1200                     (validation 1.31 bits/byte)
           jaxlm-train --config experiments/pylm_docstring.py --workdir runs/pylm_docstring
           jaxlm-eval --workdir runs/pylm_docstring --max_batches 0 [--beam_size 4]
           jaxlm-generate --workdir runs/pylm_docstring --temperature 0 --max_new_tokens 32 \
               --prompt 'def is_empty(self):\\n    return not self.items\\n'
           python experiments/code_docstring_baselines.py              (baselines)
Hardware:  a 2-core CPU, no accelerator.
Result:    see README's benchmark table (BLEU on all 164 validation pairs, greedy).
"""

from pathlib import Path

from jaxlm.config import load_config


def get_config():
    c = load_config(Path(__file__).with_name("pylm_tiny.py"))  # the pretrained model's shape
    c.task.objective = "seq2seq"
    c.data.source = "tfds:code_docstring"
    c.data.input_key = "code"
    c.data.target_key = "docstring"
    c.data.seq_len = 96  # code tokens; longer functions are cut (EOS kept)
    c.data.target_len = 32  # 96 + 32: the 128 tokens pylm_tiny was trained on
    c.data.batch_size = 32
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.01
    c.train.steps = 1500
    c.train.log_every = 100
    c.train.eval_every = 500
    c.train.eval_steps = 0  # the whole validation split
    c.train.eval_decode = 164  # decode all of it for BLEU at every eval
    c.train.checkpoint_every = 500
    c.train.init_from = "runs/pylm_long"
    return c
