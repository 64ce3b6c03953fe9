"""bert_base: BERT-base (110M) masked-LM pretraining on English Wikipedia, BERT's recipe.

12 layers, d=768, 12 heads, d_ff=3072, GELU, LayerNorm with biases, learned positions, a
32k-piece tokenizer with <mask>; 15% of tokens chosen, 80/10/10 (task.mask_* defaults);
sequences of 128, batch 256, AdamW lr 1e-4 with 10k warmup steps and linear decay, as in
Devlin et al. (2019) phase 1 (BERT's 10% of steps at length 512 is left out; no next-sentence
prediction, which RoBERTa showed unnecessary).

Commands (TFDS data prepared once with network: `tfds build wikipedia/20230601.en`):
    jaxlm-data tokenizer --config experiments/bert_base.py --out runs/wiki_32k_mask.model
    jaxlm-data prepare --config experiments/bert_base.py --out gs://BUCKET/wiki_en_32k \
        --config.data.tokenizer=runs/wiki_32k_mask.model
    jaxlm-train --config experiments/bert_base.py --workdir runs/bert_base \
        --config.data.source=prepared:gs://BUCKET/wiki_en_32k
Hardware:  one TPU v4-8 host or one 8-GPU node (data=-1 fills the devices); about 4 days on
           16 TPU v3 chips for BERT's 1M steps.
Published: BERT-base masked-LM accuracy is not reported by the paper; its downstream figure
           is SST-2 93.5 (GLUE test) after fine-tuning: experiments/sst2.py does that step.
Result:    not yet run (no accelerator time in this project's sessions); bert_tiny is the CPU
           version of this recipe.
"""

from jaxlm.config import base_config, gpt2_style


def get_config():
    c = base_config()
    c.model.family = "encoder"
    c.task.objective = "mlm"
    gpt2_style(c.model)  # learned positions, LayerNorm with biases, GELU: BERT's blocks
    c.model.norm_eps = 1e-12
    c.model.d_model = 768
    c.model.num_layers = 12
    c.model.num_heads = 12
    c.model.d_ff = 3072
    c.model.max_len = 512
    c.model.dropout = 0.1
    c.data.source = "tfds:wikipedia/20230601.en"
    c.data.eval_split = "train[99%:]"  # Wikipedia has one split: hold out its last 1%
    c.data.train_split = "train[:99%]"
    c.data.seq_len = 128
    c.data.batch_size = 256
    c.data.tokenizer_vocab_size = 32768
    c.data.tokenizer_type = "unigram"
    c.data.tokenizer_mask = True
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 10_000
    c.optim.schedule = "linear"
    c.optim.min_lr_ratio = 0.0
    c.optim.b2 = 0.999
    c.optim.eps = 1e-6
    c.optim.weight_decay = 0.01
    c.train.steps = 1_000_000
    c.train.log_every = 100
    c.train.eval_every = 10_000
    c.train.eval_steps = 50
    c.train.checkpoint_every = 10_000
    return c
