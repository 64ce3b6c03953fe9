"""classify_tiny: which standard-library package (8 classes) a function comes from, fine-tuned.

The task is `tfds:stdlib_package` (jaxlm/data/builtin/task_builders.py): functions of the embedded
Python 3.11 standard library from 8 packages, split by file exactly as the `python_stdlib`
corpus is, so the pretrained model never saw a validation function. The model is pylm_tiny's
decoder (4 layers, d=128) with a classification head on the mean of its token states; it
starts from runs/pylm_long (pylm_tiny trained 1200 steps) and takes that run's tokenizer.

Commands:  jaxlm-train --config experiments/pylm_tiny.py --workdir runs/pylm_long \
               --config.train.steps=1200                     (validation 1.31 bits/byte)
           jaxlm-train --config experiments/classify_tiny.py --workdir runs/classify_tiny
           # the same model from scratch, for comparison (same tokenizer, same steps):
           jaxlm-train --config experiments/classify_tiny.py --workdir runs/classify_scratch \
               --config.train.init_from= --config.data.tokenizer=runs/pylm_long/tokenizer.model
           jaxlm-eval --workdir runs/classify_tiny   (accuracy and macro F1, whole validation)
Hardware:  a 2-core CPU, no accelerator; 5-10 minutes per run (pylm_long: ~25), cores shared.
Result:    whole validation split (236 functions) after 300 steps, accuracy / macro F1, seeds
           0, 1, 2 (--config.train.seed; 2026-11-23, jax 0.10.2):
             fine-tuned, mean pooling:    0.742/0.712  0.725/0.687  0.712/0.673  mean 0.726/0.691
             scratch, mean pooling:       0.517/0.355  0.725/0.669  0.640/0.559  mean 0.627/0.528
             scratch, last-token pooling: 0.716/0.630  0.686/0.618  0.619/0.556  mean 0.674/0.601
           Fine-tuning from runs/demo (300 pretraining steps, 1.80 bits/byte) helps less: seed 0
           mean pooling 0.636/0.553, last-token pooling 0.614/0.506.
"""

from pathlib import Path

from jaxlm.config import load_config


def get_config():
    c = load_config(Path(__file__).with_name("pylm_tiny.py"))  # the pretrained model's shape
    c.task.objective = "classify"
    c.model.num_classes = 8
    c.model.dropout = 0.1
    # Mean pooling: a pretrained LM's last state predicts the next token and carries little
    # of the whole function; the mean of all states does (and fine-tuning gains more from it).
    c.model.pooling = "mean"
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
    c.train.init_from = "runs/pylm_long"
    return c
