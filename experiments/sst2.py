"""sst2: fine-tune bert_base on GLUE SST-2 sentiment (2 classes), BERT's fine-tuning recipe.

The pretrained encoder comes from experiments/bert_base.py's run (train.init_from), with its
tokenizer; a new classification head (BERT's tanh pooler on the first token) is initialized.
Batch 32, lr 2e-5, 3 epochs of the 67,349 training sentences (6,315 steps), 10% warmup.

Commands (GLUE prepared once with network: `tfds build glue/sst2`):
    jaxlm-train --config experiments/sst2.py --workdir runs/sst2 \
        --config.train.init_from=runs/bert_base
    jaxlm-eval --workdir runs/sst2 --max_batches 0   (accuracy and macro F1 on validation)
Hardware:  one GPU or TPU host; minutes.
Published: BERT-base 93.5 accuracy on the SST-2 test set (Devlin et al. 2019, GLUE server);
           about 92-93 on the 872-sentence validation split this evaluates.
Result:    not yet run (needs bert_base's pretrained run).
"""

from pathlib import Path

from jaxlm.config import load_config


def get_config():
    c = load_config(Path(__file__).with_name("bert_base.py"))  # the pretrained model's shape
    c.task.objective = "classify"
    c.model.num_classes = 2
    c.model.pooling = "first"
    c.data.source = "tfds:glue/sst2"
    c.data.input_key = "sentence"
    c.data.label_key = "label"
    c.data.train_split, c.data.eval_split = "train", "validation"
    c.data.seq_len = 128
    c.data.batch_size = 32
    c.optim.lr = 2e-5
    c.optim.warmup_steps = 630
    c.optim.schedule = "linear"
    c.train.steps = 6315
    c.train.eval_every = 500
    c.train.eval_steps = 0
    c.train.checkpoint_every = 2000
    c.train.init_from = "runs/bert_base"
    return c
