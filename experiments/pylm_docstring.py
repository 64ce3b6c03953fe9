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
Wall time: about 30 minutes for 1500 steps (lr 1e-3, dropout 0).
Result:    all 164 validation pairs (2026-11-23, jax 0.10.2, sacrebleu 2.6.0): greedy BLEU
           0.93 / 1.25 / 1.24 at steps 500 / 1000 / 1500 (chrF 15.8 / 17.2 / 17.6, validation
           loss 3.41 / 3.54 / 3.72); beam 4: 0.93 @1000, 1.68 @1500. Seeds 1 and 2
           (--config.train.seed=N, 2026-11-30): greedy 1.39 / 1.33 / 1.68 and 1.51 / 1.79 / 1.36,
           beam 4 @1500 1.40 and 1.50. The same model from
           scratch (--config.train.init_from= --config.data.tokenizer=runs/pylm_long/
           tokenizer.model): BLEU 0.38 / 0.73 / 0.72, loss 4.13 / 3.97 / 4.05. Baselines
           (experiments/code_docstring_baselines.py): "Return the" + the name's words 0.60,
           the name's words 0.07, pylm_tiny zero-shot (def line + triple quote) 0.46; copying
           the docstring of the most similar training function (retrieval) 8.17, 3.58 without
           the 12 validation docstrings that occur verbatim in train.
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
