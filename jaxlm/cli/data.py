"""jaxlm-data COMMAND --config experiments/NAME.py [--config.KEY=VALUE ...]

Commands:
  tokenizer --out PATH   train the configured SentencePiece tokenizer on a sample of data.source
  prepare --out DIR      tokenize data.source once into a cache; train with data.source=prepared:DIR
                         (seq2seq/classify: the example cache, read with data.cache_dir=DIR)
  inspect                print decoded rows with their segment ids, positions and loss masks
  bench                  print one JSON line: tokens/s from raw text and from the cache
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

from absl import app, flags, logging

from jaxlm.cli import common

COMMANDS = ("tokenizer", "prepare", "inspect", "bench")
flags.DEFINE_string("config", None, "Experiment file defining get_config().")
flags.DEFINE_string("out", None, "tokenizer: the .model path; prepare: the cache directory.")
flags.DEFINE_integer("shard_tokens", 1 << 27, "prepare: tokens per shard file.")
flags.DEFINE_enum("split", "train", ["train", "validation"], "inspect: which split.")
flags.DEFINE_integer("step", 0, "inspect: the training step whose batch is shown.")
flags.DEFINE_integer("rows", 2, "inspect: rows shown.")
flags.DEFINE_integer("steps", 2000, "bench: batches read from the cache.")
FLAGS = flags.FLAGS
_OVERRIDES: list[str] = []
PROGRAM = "jaxlm-data"


def _tokenizer(spec) -> None:
    from jaxlm import storage
    from jaxlm.data import run_tokenizer

    out = _required_out()
    if storage.is_remote(out):  # SentencePiece writes locally; copy the model up afterwards
        with tempfile.TemporaryDirectory() as tmp:
            tok = run_tokenizer.train_tokenizer(spec, Path(tmp) / "tokenizer.model")
            storage.write_bytes(out, tok.path.read_bytes())
    else:
        tok = run_tokenizer.train_tokenizer(spec, out)
    print(
        f"wrote {out}: {tok.vocab_size} {spec.tokenizer.model_type} pieces, sha256 "
        f"{tok.sha256}; use it with --config.data.tokenizer={out}"
    )


def _prepare(spec) -> None:
    from jaxlm import storage
    from jaxlm.data import run_tokenizer
    from jaxlm.data.documents import prepare

    out = _required_out()
    if any(s.kind == "prepared" for s in spec.sources):
        raise ValueError("data.source is already prepared; prepare the original sources instead")
    tok = run_tokenizer.resolve_tokenizer(spec)
    if spec.layout == "examples":
        _prepare_examples(spec, tok, out)
        return
    entries = []
    for i, source in enumerate(spec.sources):
        many = len(spec.sources) > 1
        directory = storage.join(out, f"{i}-{source.slug}") if many else out
        manifest = prepare.prepare_source(
            source,
            directory,
            tok,
            spec.read,
            spec.clean,
            shard_tokens=FLAGS.shard_tokens,
            progress=True,
        )
        tokens = {k: v["num_tokens"] for k, v in manifest["splits"].items()}
        print(f"wrote {directory}: {tokens} tokens, tokenizer sha256 {tok.sha256[:12]}")
        weight = f"@{source.weight:g}" if many else ""
        entries.append(f"prepared:{directory}{weight}")
    print(f"train on it with --config.data.source={','.join(entries)}")


def _prepare_examples(spec, tok, out: str) -> None:
    """Example tasks: the tokenized example cache under --out (used as data.cache_dir), and the
    tokenizer beside it, so a multi-host job can read both from shared storage."""
    from jaxlm import storage
    from jaxlm.data.examples import cache

    _, directory, manifest = cache.build_cache(dataclasses.replace(spec, cache_root=out), tok)
    tok_path = storage.join(out, tok.filename)
    storage.write_bytes(tok_path, tok.to_bytes())
    counts = {k: v["examples"] for k, v in manifest["splits"].items()}
    print(f"wrote {directory}: {counts} examples, tokenizer sha256 {tok.sha256[:12]}")
    print(f"train on it with --config.data.cache_dir={out} --config.data.tokenizer={tok_path}")


def _inspect(spec) -> None:
    from jaxlm.data import run_tokenizer
    from jaxlm.data.documents import diagnostics
    from jaxlm.data.documents.text import TextData

    text = TextData(spec, run_tokenizer.resolve_tokenizer(spec))
    print(diagnostics.describe_rows(text, FLAGS.split, FLAGS.step, FLAGS.rows))


def _bench(spec, source: str) -> None:
    from jaxlm.data.documents import diagnostics

    result = diagnostics.bench(spec, steps=FLAGS.steps)
    line = {"config": FLAGS.config, "overrides": _OVERRIDES, "source": source, **result}
    print(json.dumps(line), flush=True)


def _required_out() -> str:
    if not FLAGS.out:
        raise ValueError("--out is required for this command")
    return FLAGS.out


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)
    from jaxlm import config as config_lib

    command = argv[1] if len(argv) == 2 else None
    if command not in COMMANDS or not FLAGS.config:
        common.fail(
            PROGRAM,
            ValueError(f"usage: {PROGRAM} {{{'|'.join(COMMANDS)}}} --config FILE [flags]"),
        )
    try:
        config = config_lib.load_config(FLAGS.config, _OVERRIDES)
        spec = config_lib.data_spec(config)
        if spec.layout == "synthetic":
            raise ValueError("data.source=synthetic has no text; choose a text source")
        if command in ("inspect", "bench") and spec.layout == "examples":
            raise ValueError(
                f"{PROGRAM} {command} reads documents, and task.objective="
                f"{config.task.objective} reads labelled examples: `{PROGRAM} prepare` builds "
                "their cache, and jaxlm-train writes their length statistics to WORKDIR/data.json"
            )
        if command == "bench":
            _bench(spec, config.data.source)
        else:
            {"tokenizer": _tokenizer, "prepare": _prepare, "inspect": _inspect}[command](spec)
    except common.USER_ERRORS as e:
        common.fail(PROGRAM, e)


def run() -> None:
    app.run(main, flags_parser=common.make_flags_parser(_OVERRIDES, __name__))


if __name__ == "__main__":
    run()
