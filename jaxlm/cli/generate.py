"""jaxlm-generate --workdir DIR --prompt TEXT [--prompt_file F]
[--max_new_tokens N | --max_length N] [--temperature T] [--top_k K] [--top_p P]
[--num_samples N] [--seed S] [--step N]

Samples continuations from a trained run with a KV cache. Every --prompt and every line of
--prompt_file is one prompt (`\\n` and `\\t` in them stand for newline and tab); prompts of any
lengths are decoded as one batch. A single prompt and sample streams to the terminal.
The length is --max_new_tokens new tokens (64 if neither is given) or, as transformers'
`max_length`, --max_length tokens of prompt and continuation together, for each prompt;
--num_samples is transformers' `num_return_sequences`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags, logging

from jaxlm.cli import common

flags.DEFINE_string("workdir", None, "Run directory written by jaxlm-train.")
flags.DEFINE_multi_string("prompt", [], "Prompt text; repeat for several prompts.")
flags.DEFINE_string("prompt_file", None, "File with one prompt per line.")
flags.DEFINE_integer(
    "max_new_tokens", None, "Tokens to generate per sample at most (default 64); or --max_length."
)
flags.DEFINE_integer(
    "max_length",
    None,
    "Prompt + new tokens per sample at most (transformers' max_length); or --max_new_tokens.",
)
flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 is greedy and deterministic.")
flags.DEFINE_integer("top_k", 0, "Sample only among the k most likely tokens; 0: all.")
flags.DEFINE_float("top_p", 1.0, "Sample only in the nucleus holding this probability; 1: all.")
flags.DEFINE_integer("num_samples", 1, "Samples per prompt (transformers' num_return_sequences).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
FLAGS = flags.FLAGS
_OVERRIDES: list[str] = []


def read_prompts(prompts: list[str], prompt_file: str | None) -> list[str]:
    out = list(prompts)
    if prompt_file:
        path = Path(prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompt_file {path} not found")
        out += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not out:
        raise ValueError("no prompt: pass --prompt TEXT or --prompt_file FILE")
    if any(not p.strip() for p in out):
        raise ValueError("empty prompt: give at least one non-blank character to continue")
    return [p.replace("\\n", "\n").replace("\\t", "\t") for p in out]


class Streamer:
    """Prints one sequence's text as its tokens arrive from the device loop.

    Callbacks may arrive out of order or repeated (one per device), so tokens are kept by step
    and printed once their predecessors are in.
    """

    def __init__(self, lm, prompt: str):
        self.lm, self.prompt_ids, self.eos_id = lm, lm.prompt_ids(prompt), lm.tokenizer.eos_id
        self.by_step: dict[int, int] = {}
        self.ids: list[int] = []
        self.shown, self.done = "", False

    def __call__(self, i, tokens_B) -> None:
        self.by_step.setdefault(int(i), int(tokens_B[0]))
        while not self.done and len(self.ids) in self.by_step:
            token = self.by_step[len(self.ids)]
            if token == self.eos_id:
                self.done = True
                break
            self.ids.append(token)
        # A character split over byte-fallback tokens decodes as U+FFFD until it is complete.
        text = self.lm.continuation(self.prompt_ids, self.ids).rstrip("\ufffd")
        sys.stdout.write(text[len(self.shown) :])
        sys.stdout.flush()
        self.shown = text


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    from jaxlm import config as config_lib
    from jaxlm.decode_settings import SamplingSettings

    if not FLAGS.workdir:
        common.fail("jaxlm-generate", ValueError("--workdir is required"))
    try:
        prompts = read_prompts(FLAGS.prompt, FLAGS.prompt_file)
        if FLAGS.num_samples < 1:
            raise ValueError(f"--num_samples must be >= 1, got {FLAGS.num_samples}")
        if FLAGS.max_new_tokens is not None and FLAGS.max_length is not None:
            raise ValueError(
                "pass --max_new_tokens or --max_length, not both (--max_length counts the "
                "prompt's tokens too, as transformers' max_length)"
            )
        # Refused before JAX loads: the sampling flags (an unset --max_new_tokens comes from
        # --max_length or its default, checked later), then a folder that is not a run.
        SamplingSettings(
            max_new_tokens=1 if FLAGS.max_new_tokens is None else FLAGS.max_new_tokens,
            temperature=FLAGS.temperature,
            top_k=FLAGS.top_k,
            top_p=FLAGS.top_p,
        ).check()
        config_lib.load_run_config(FLAGS.workdir, _OVERRIDES)
        from jaxlm.inference import LanguageModel

        lm = LanguageModel.load(FLAGS.workdir, step=FLAGS.step, overrides=_OVERRIDES)
        if lm.tokenizer is None:
            raise ValueError(f"{FLAGS.workdir} has no tokenizer (a synthetic-data run)")
        batch = [p for p in prompts for _ in range(FLAGS.num_samples)]
        kwargs = dict(
            max_new_tokens=FLAGS.max_new_tokens,
            max_length=FLAGS.max_length,
            temperature=FLAGS.temperature,
            top_k=FLAGS.top_k,
            top_p=FLAGS.top_p,
            seed=FLAGS.seed,
        )
        if len(batch) == 1:
            sys.stdout.write(batch[0])
            streamer = Streamer(lm, batch[0])
            lm.generate(batch, on_tokens=streamer, **kwargs)
            sys.stdout.write("\n")
            return
        texts = lm.generate(batch, **kwargs)
    except common.USER_ERRORS as e:
        common.fail("jaxlm-generate", e)
    for i, (prompt, text) in enumerate(zip(batch, texts, strict=True)):
        p, n = divmod(i, FLAGS.num_samples)
        print(f"=== prompt {p + 1}, sample {n + 1} ===\n{prompt}{text}", flush=True)


def run() -> None:
    app.run(main, flags_parser=common.make_flags_parser(_OVERRIDES, __name__))


if __name__ == "__main__":
    run()
