"""classify_tiny: which standard-library package (8 classes) a function comes from, fine-tuned.

The task is `tfds:stdlib_package` (jaxlm/data/task_builders.py): functions of the embedded
Python 3.11 standard library from 8 packages, split by file exactly as the `python_stdlib`
corpus is, so the pretrained model never saw a validation function. The model is pylm_tiny's
decoder (4 layers, d=128) with a classification head on the last real token; by default it
starts from the `make demo` run (runs/demo, pylm_tiny) and takes that run's tokenizer.

Commands:  make demo    (pretrains runs/demo, ~5 minutes)
           jaxlm-train --config experiments/classify_tiny.py --workdir runs/classify_tiny
           # the same model from scratch, for comparison (same tokenizer, same steps):
           jaxlm-train --config experiments/classify_tiny.py --workdir runs/classify_scratch \\
               --config.train.init_from= --config.data.tokenizer=runs/demo/tokenizer.model
           jaxlm-eval --workdir runs/classify_tiny   (accuracy and macro F1, whole validation)
Hardware:  a 2-core CPU, no accelerator; ~10 minutes per run while sharing the cores.
Result:    whole validation split (236 functions), accuracy / macro F1 (2026-11-23, jax 0.10.2):
           fine-tuned from runs/demo: 0.424 / 0.225 @100, 0.585 / 0.520 @200, 0.614 / 0.506 @300;
           from scratch:             0.551 / 0.367 @100, 0.648 / 0.554 @200, 0.716 / 0.630 @300.
           At --config.optim.lr=3e-3 both: fine-tuned 0.678 / 0.585, scratch 0.589 / 0.475 @300.
           The best scratch run still beats the best fine-tuned one (issue 5 open).
"""

from pathlib import Path

from jaxlm.config import load_config


def get_config():
    c = load_config(Path(__file__).with_name("pylm_tiny.py"))  # the pretrained model's shape
    c.task.objective = "classify"
    c.model.num_classes = 8
    c.model.dropout = 0.1
    c.data.source = "tfds:stdlib_package"
    c.data.input_key = "code"
    c.data.label_key = "label"
    c.data.seq_len = 128  # functions average ~300 characters (~100 tokens); longer are cut
    c.data.batch_size = 32
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 20
    c.optim.weight_decay = 0.01
    c.train.steps = 300
    c.train.log_every = 50
    c.train.eval_every = 100
    c.train.eval_steps = 0  # the whole validation split (236 functions)
    c.train.checkpoint_every = 100
    c.train.init_from = "runs/demo"
    return c
