"""t5_small: a T5-small-sized encoder-decoder trained on WMT14 German to English from scratch.

T5-small's shape: 6 + 6 layers, d=512, 8 heads, d_ff=2048, relative position buckets (32,
max distance 128), RMSNorm, shared and tied embeddings, a 32k-piece tokenizer trained on both
languages; inputs and targets of up to 128 tokens, batch 256, AdamW with 4k warmup steps and
cosine decay, dropout 0.1, 100k steps.

Commands (WMT14 prepared once with network: `tfds build wmt14_translate/de-en`):
    jaxlm-data prepare --config experiments/t5_small.py --out /shared/wmt14_cache
    jaxlm-train --config experiments/t5_small.py --workdir runs/t5_small \
        --config.data.cache_dir=/shared/wmt14_cache \
        --config.data.tokenizer=/shared/wmt14_cache/tokenizer.model
    jaxlm-eval --workdir runs/t5_small --max_batches 0 --beam_size 4 --length_penalty 0.6
Hardware:  one 8-GPU node or a TPU v4-8 host; ~1 day.
Published: newstest2014 (the test split, set data.eval_split=test for the final figure): the
           Transformer base reaches 27.3 BLEU En->De (Vaswani et al. 2017); T5-small (pretrained
           on C4, then fine-tuned) 26.7 En->De (Raffel et al. 2020). De->En from scratch at this
           size is typically a few BLEU higher than En->De.
Result:    not yet run (no accelerator time in this project's sessions); t5_tiny is the CPU
           version of this recipe.
"""

from jaxlm.config import base_config


def get_config():
    c = base_config()
    c.model.family = "encoder_decoder"
    c.task.objective = "seq2seq"
    c.model.positions = "relative"
    c.model.mlp = "gelu"
    c.model.d_model = 512
    c.model.num_layers = 6
    c.model.num_heads = 8
    c.model.d_ff = 2048
    c.model.dropout = 0.1
    c.data.source = "tfds:wmt14_translate/de-en"
    c.data.input_key = "de"
    c.data.target_key = "en"
    c.data.train_split, c.data.eval_split = "train", "validation"
    c.data.seq_len = 128
    c.data.target_len = 128
    c.data.batch_size = 256
    c.data.tokenizer_vocab_size = 32768
    c.data.tokenizer_type = "unigram"
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 4000
    c.optim.b2 = 0.98
    c.optim.weight_decay = 0.01
    c.train.steps = 100_000
    c.train.log_every = 100
    c.train.eval_every = 5000
    c.train.eval_steps = 0
    c.train.checkpoint_every = 5000
    return c
