"""A trained run, from Python or the command line: evaluate, score and generate.

`evaluate_run(workdir)` is the eval program: it restores only the parameters, straight into the
training mesh's layout, and runs the training loop's own eval step, so it reproduces the loop's
numbers; for seq2seq it also decodes the validation inputs for BLEU (jaxlm/seq2seq_eval.py).
`LanguageModel.load(workdir)` is the notebook API:

    lm = LanguageModel.load("runs/demo")
    lm.score(["def f(x):\\n    return x\\n"])   # per-token log-probs
    lm.generate(["import "], max_new_tokens=32, temperature=0.8, top_k=40)
    lm.generate(["import "], max_length=50, num_return_sequences=5)  # transformers' names
    clf.classify(["a fine film"])  # class probabilities (runs with a classification head)
    mlm.fill_mask("def f(x):\\n    <mask> x\\n")  # top tokens per mask (encoder runs)

`LanguageModel.from_pretrained(hf_dir)` converts a Hugging Face folder in memory
(jaxlm/interop/); `jaxlm-convert import` writes it as a run directory instead.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxlm import config as config_lib
from jaxlm import (
    eval_loop,
    interop,
    monitor,
    predict,
    seq2seq_eval,
    sharding,
    state,
    train,
    transforms,
)
from jaxlm.compress import lora
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.data.types import EOS_ID
from jaxlm.decode_settings import SamplingSettings
from jaxlm.generate import make_generate
from jaxlm.state import ModelState


def run_config(workdir: str | Path, overrides: Sequence[str] = ()):
    """A run's config for evaluation or generation on this machine (see config.for_platform)."""
    config = config_lib.load_run_config(workdir, overrides)
    return config_lib.for_platform(config, jax.devices()[0].platform)


def _reader(config) -> state.Reader:
    """How a run's checkpoint becomes parameters: a LoRA run's adapters come merged into their
    base, any other run's parameters are restored as they are."""
    if config.train.lora_rank > 0:
        return functools.partial(lora.load_merged, config)
    return ModelState.restore


def evaluate_run(
    workdir: str | Path,
    *,
    step: int | None = None,
    max_batches: int | None = None,
    overrides: Sequence[str] = (),
    devices=None,
    decode: bool = True,
    beam_size: int = 1,
    length_penalty: float = 0.6,
    max_decode_examples: int = 0,
) -> dict:
    """The objective's metrics of a checkpoint on the configured validation data.

    lm: loss, perplexity and bits per byte; mlm: loss, perplexity and accuracy on masked tokens;
    classify: loss, accuracy and macro F1; seq2seq: teacher-forced token loss, perplexity and
    accuracy, then (with `decode`) the validation inputs decoded up to data.target_len tokens,
    greedily (beam_size 1) or by beam search with GNMT `length_penalty`, scored against the
    references: bleu and chrf (sacrebleu, 0-100), exact_match (a fraction), decoded_examples,
    beam_size and length_penalty. The first examples' (input, reference, hypothesis) go to
    WORKDIR/eval_samples.jsonl.

    `max_batches` None takes the run's train.eval_steps (what the loop evaluated); 0 is all.
    `max_decode_examples` 0 decodes the examples those batches hold (max_batches *
    data.batch_size; all when max_batches is 0). Config overrides may point the data at
    another source.
    """
    # Checked before any loading, so a bad flag fails in a second, not after the restore.
    config_lib.check_eval_args(
        max_batches=max_batches,
        max_decode_examples=max_decode_examples,
        beam_size=beam_size,
        length_penalty=length_penalty,
    )
    config = run_config(workdir, overrides)
    names = transforms.check(config_lib.transform_names(config))
    # A missing step fails before the data is built.
    ckpt, step = state.open_checkpoint(config, workdir, step)
    try:
        s = train.setup(config, workdir, devices, optimizer=False)
        params = _reader(config)(s.model, ckpt, step, s.data.tokenizer_sha256)
        params, s.model = s.model.transformed(params, names)
    finally:
        ckpt.close()
    with s.model.rules_context():
        metrics = eval_loop.run_eval(s, eval_loop.make_eval_step(s), params, max_batches)
    if decode and config.task.objective == "seq2seq":
        num_batches = config.train.eval_steps if max_batches is None else max_batches
        metrics.update(
            seq2seq_eval.evaluate_generation(
                s,
                params,
                num_examples=max_decode_examples or num_batches * config.data.batch_size,
                num_batches=num_batches,
                beam_size=beam_size,
                length_penalty=length_penalty,
                samples_path=str(epath.Path(workdir) / seq2seq_eval.SAMPLES_FILE),
            )
        )
    return {**metrics, "step": step}


@dataclasses.dataclass
class LanguageModel:
    """A restored decoder or encoder model and its tokenizer: compiled scoring and sampling
    (decoders), class probabilities (a classification head) and mask filling (encoders)."""

    config: object
    state: ModelState
    params: dict
    tokenizer: object | None
    step: int

    @classmethod
    def load(cls, workdir: str | Path, step: int | None = None, overrides=(), devices=None):
        config = run_config(workdir, overrides)
        _check_family(config, f"{workdir} trained")
        tok_path = tokenizer_lib.run_file(workdir)  # tokenizer.model or tokenizer.json
        tokenizer = None if tok_path is None else tokenizer_lib.load(tok_path)
        mesh = sharding.mesh_from_config(config.mesh, devices)
        sha = tokenizer.sha256 if tokenizer else None
        run = state.open_run(workdir, config, step, mesh, sha, read=_reader(config))
        return cls(config, run.model, run.params, tokenizer, run.step)

    @classmethod
    def from_pretrained(cls, hf_dir: str | Path, overrides=(), devices=None):
        """A Hugging Face model folder (GPT-2, LLaMA, ...: jaxlm/interop/), converted in memory
        with its tokenizer; no run directory is written."""
        config, params = interop.load_hf(hf_dir)
        config_lib.apply_overrides(config, overrides)
        config_lib.validate(config)
        config = config_lib.for_platform(config, jax.devices()[0].platform)
        _check_family(config, f"{hf_dir} holds")
        tokenizer = interop.convert.hf_tokenizer(hf_dir)
        mesh = sharding.mesh_from_config(config.mesh, devices)
        cfg = config_lib.model_config(config, config.model.vocab_size)
        model = ModelState.build(cfg, mesh, config.mesh.rules)
        names = transforms.check(config_lib.transform_names(config))
        params, model = model.transformed(jax.device_put(params, model.shardings), names)
        return cls(config, model, params, tokenizer, 0)

    @property
    def context_len(self) -> int:
        """Longest prompt plus continuation: the length the model was trained on."""
        return config_lib.row_len(self.config)

    @property
    def model(self) -> nnx.Module:
        """The NNX module with the restored parameters, for custom research code."""
        return self.state.merge(self.params)

    def _rules(self):
        rules = sharding.replicated_batch_rules(self.config.mesh.rules)
        return sharding.use_rules(self.state.mesh, rules)

    def _replicated(self, x: np.ndarray) -> jax.Array:
        return jax.device_put(x, NamedSharding(self.state.mesh, PartitionSpec()))

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this run has no tokenizer (synthetic data): pass token ids")
        return self.tokenizer.encode(text)

    def prompt_ids(self, text: str) -> list[int]:
        """A prompt's ids. A prefix LM (task.objective=seq2seq) was trained on inputs cut to
        data.seq_len - 1 tokens + EOS: prompts are cut and ended the same way."""
        ids = self.encode(text)
        if self.config.task.objective != "seq2seq":
            return ids
        return ids[: self.config.data.seq_len - 1] + [self.tokenizer.eos_id]

    @property
    def family(self) -> str:
        return self.config.model.family

    def _need_decoder(self, what: str) -> None:
        if self.family != "decoder":
            raise ValueError(
                f"{what} needs a decoder (model.family=decoder); this run is a "
                f"model.family={self.family} model: use fill_mask or classify"
            )

    def score(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Log-prob of each token of each text given the tokens before it (the first has none)."""
        self._need_decoder("scoring")
        ids = [self.encode(t) for t in texts]
        for t, x in zip(texts, ids, strict=True):
            if not 2 <= len(x) <= self.context_len:
                raise ValueError(
                    f"text of {len(x)} tokens cannot be scored: it needs 2 to "
                    f"{self.context_len} tokens (the context); split it ({t[:40]!r})"
                )
        # One padded width (the context): right padding cannot change causal log-probs, and
        # every call reuses one compilation per batch size.
        tokens = np.zeros((len(ids), self.context_len), np.int32)
        for i, x in enumerate(ids):
            tokens[i, : len(x)] = x
        with self._rules():
            out = np.asarray(self._logprobs(self.params, self._replicated(tokens)))
        return [out[i, : len(x) - 1] for i, x in enumerate(ids)]

    @functools.cached_property
    def _logprobs(self):
        graphdef = self.state.graphdef

        @jax.jit
        def logprobs(params, tokens_BT):
            logits = nnx.merge(graphdef, params)(tokens_BT[:, :-1]).astype(jnp.float32)
            logp = jax.nn.log_softmax(logits, axis=-1)
            return jnp.take_along_axis(logp, tokens_BT[:, 1:, None], axis=-1)[..., 0]

        return logprobs

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        settings: SamplingSettings,
        *,
        seed: int = 0,
        on_tokens: Callable[[int, np.ndarray], None] | None = None,
        limits: Sequence[int] | None = None,
    ) -> list[list[int]]:
        """Continuations of token-id prompts, each up to its EOS (kept) or max_new_tokens
        (or its own limit: `limits`, one per prompt, at most max_new_tokens).

        Prompts to a prefix LM (task.objective=seq2seq) must end with the EOS separator, as
        `prompt_ids` ends them.
        """
        self._need_decoder("generation")
        settings.check()
        lengths = [len(p) for p in prompts]
        if not prompts or min(lengths) == 0:
            raise ValueError("empty prompt: give at least one token of text to continue")
        limits = [settings.max_new_tokens] * len(prompts) if limits is None else list(limits)
        longest, new = max(zip(lengths, limits, strict=True), key=sum)
        if longest + new > self.context_len:
            raise ValueError(
                f"prompt of {longest} tokens + max_new_tokens {new} exceeds "
                f"the model's context of {self.context_len} tokens; shorten the prompt or "
                "lower --max_new_tokens"
            )
        tokens = np.zeros((len(prompts), max(lengths)), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
        fn = self._generate_fn(settings, on_tokens)
        with self._rules():
            out, counts = fn(
                self.params,
                self._replicated(tokens),
                self._replicated(np.asarray(lengths, np.int32)),
                jax.random.key(seed),
                self._replicated(np.asarray(limits, np.int32)),
            )
        out, counts = np.asarray(out), np.asarray(counts)
        return [list(out[i, : counts[i]]) for i in range(len(prompts))]

    def _generate_fn(self, settings: SamplingSettings, on_tokens):
        """One compiled decode loop per (settings, callback): repeated calls skip tracing."""
        cache = self.__dict__.setdefault("_generate_fns", {})
        key = (settings, on_tokens)
        if key not in cache:
            cache[key] = make_generate(self.state.graphdef, settings, on_tokens)
        return cache[key]

    def sampling_settings(self, **kwargs) -> SamplingSettings:
        """Settings with this tokenizer's EOS and padding ids."""
        if self.tokenizer is not None:
            kwargs.setdefault("eos_id", self.tokenizer.eos_id)
            kwargs.setdefault("pad_id", tokenizer_lib.generation_pad_id(self.tokenizer))
        return SamplingSettings(**kwargs)

    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int | None = None,
        max_length: int | None = None,
        num_samples: int = 1,
        num_return_sequences: int | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        on_tokens: Callable[[int, np.ndarray], None] | None = None,
    ) -> list[str]:
        """Text continuations of text prompts (EOS not included), `num_samples` per prompt
        (transformers' `num_return_sequences`), prompt by prompt.

        Length: `max_new_tokens` new tokens (64 when neither is given), or transformers'
        `max_length`: prompt tokens + new tokens at most, for each prompt on its own.
        """
        self._need_decoder("generation")
        n = predict.samples_per_prompt(num_samples, num_return_sequences)
        if not prompts or any(not p for p in prompts):
            raise ValueError("empty prompt: give at least one character of text to continue")
        prompt_ids = [self.prompt_ids(p) for p in prompts for _ in range(n)]
        limits = predict.new_token_limits(
            [len(p) for p in prompt_ids], max_new_tokens, max_length, self.context_len
        )
        settings = self.sampling_settings(
            max_new_tokens=max(limits), temperature=temperature, top_k=top_k, top_p=top_p
        )
        ids = self.generate_ids(prompt_ids, settings, seed=seed, on_tokens=on_tokens, limits=limits)
        return [
            self.continuation(p, [t for t in x if t != settings.eos_id])
            for p, x in zip(prompt_ids, ids, strict=True)
        ]

    def continuation(self, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
        """Text of new_ids as it reads after the prompt (decoding alone may drop a space)."""
        head = self.tokenizer.decode(list(prompt_ids))
        full = self.tokenizer.decode(list(prompt_ids) + list(new_ids))
        return full[len(head) :] if full.startswith(head) else self.tokenizer.decode(new_ids)

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """The run's name for each class (task.class_names), in label order, if it has them."""
        return tuple(self.config.task.get("class_names", ())) or None

    def classify(self, texts: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        """Class probabilities [len(texts), num_classes] (softmax of the classification head).

        Each text is encoded as the classify data encodes it: the tokenizer's CLS first if
        data.prepend_cls (BERT's [CLS]), its tokens (cut to fit data.seq_len, as in training),
        then EOS; `class_names` names the columns where the run records them.
        """
        return self.classify_ids([self.encode(t) for t in texts], batch_size=batch_size)

    def classify_ids(self, inputs: Sequence[Sequence[int]], *, batch_size: int = 32) -> np.ndarray:
        """`classify` for token-id inputs (EOS is appended here)."""
        if not self.state.model_cfg.num_classes:
            raise ValueError(
                "this run has no classification head (model.num_classes=0): fine-tune it with "
                "--config.task.objective=classify --config.model.num_classes=N"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not inputs:
            return np.zeros((0, self.state.model_cfg.num_classes), np.float32)
        eos = EOS_ID if self.tokenizer is None else self.tokenizer.eos_id
        fn = self._predict("classify", predict.make_classify)

        def run(chunk: list) -> np.ndarray:
            rows = predict.example_rows(chunk, self.config.data.seq_len, eos, self._cls_id)
            with self._rules():
                return np.asarray(fn(self.params, *map(self._replicated, rows)))

        return predict.in_chunks(run, list(inputs), batch_size)

    def fill_mask(self, text: str, *, top_k: int = 5) -> list[list[dict]]:
        """The top_k tokens for each mask in `text`, in order: one list per mask of
        {"token": id, "token_str": its text, "score": probability}, most likely first (the
        fields of transformers' fill-mask pipeline). A mask is written as the tokenizer's mask
        piece: <mask> in jaxlm-trained tokenizers, [MASK] in BERT's."""
        if self.family != "encoder":
            raise ValueError(
                f"fill_mask needs a masked LM (model.family=encoder); this run is a "
                f"model.family={self.family} model: use generate"
            )
        if self.tokenizer is None:
            raise ValueError("this run has no tokenizer (synthetic data): nothing marks a mask")
        ids = predict.masked_ids(self.tokenizer, text)
        width, vocab = self.config.data.seq_len, self.state.model_cfg.vocab_size
        if len(ids) + 1 + (self._cls_id is not None) > width:
            raise ValueError(
                f"text of {len(ids)} tokens + EOS exceeds the model's rows of {width} tokens "
                "(data.seq_len); shorten it"
            )
        if not 1 <= top_k <= vocab:
            raise ValueError(f"top_k must be in 1..{vocab} (the vocabulary), got {top_k}")
        tokens, segment_ids = predict.example_rows(
            [ids], width, self.tokenizer.eos_id, self._cls_id
        )
        with self._rules():
            fn = self._predict(("fill_mask", top_k), predict.make_fill_mask, top_k)
            probs, top = fn(self.params, self._replicated(tokens), self._replicated(segment_ids))
        return predict.candidates(
            self.tokenizer, tokens[0], np.asarray(probs)[0], np.asarray(top)[0]
        )

    @property
    def _cls_id(self) -> int | None:
        """The id that starts classify and fill-mask rows (data.prepend_cls), else None."""
        if not self.config.data.get("prepend_cls") or self.tokenizer is None:
            return None
        return self.tokenizer.cls_id

    def _predict(self, key, make: Callable, *args) -> Callable:
        """One compiled prediction function per key, built by make(graphdef, *args)."""
        cache = self.__dict__.setdefault("_predict_fns", {})
        if key not in cache:
            cache[key] = make(self.state.graphdef, *args)
        return cache[key]


def _check_family(config, where: str) -> None:
    if config.model.family not in ("decoder", "encoder"):
        raise ValueError(
            f"{where} a model.family={config.model.family} model; LanguageModel serves decoders "
            "and encoders: evaluate it with jaxlm-eval (inference.evaluate_run)"
        )


def write_eval_record(workdir: str | Path, record: dict, split: str) -> None:
    """Append to DIR/eval_metrics.jsonl and TensorBoard (DIR/tensorboard/jaxlm-eval)."""
    writer = monitor.MetricsWriter(
        workdir, jsonl_name="eval_metrics.jsonl", tensorboard_dir="tensorboard/jaxlm-eval"
    )
    numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
    extra = {"overrides": record["overrides"]} if record.get("overrides") else {}
    writer.write(record["step"], {**{f"{split}/{k}": v for k, v in numbers.items()}, **extra})
    writer.close()
