"""jaxlm-data COMMAND --config experiments/NAME.py [--config.KEY=VALUE ...]

Commands:
  tokenizer --out PATH   train the configured SentencePiece tokenizer on a sample of data.source
  prepare --out DIR      tokenize data.source once into a cache; train with data.source=prepared:DIR
                         (seq2seq/classify: the example cache, read with data.cache_dir=DIR)
  inspect                print decoded rows with their segment ids, positions and loss masks
  bench                  print one JSON line: tokens/s from raw text and from the cache
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from absl import app, flags, logging

from jaxlm.cli import common
from jaxlm.config import EXAMPLE_OBJECTIVES

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


def _tokenizer(config, specs) -> None:
    from jaxlm import storage
    from jaxlm.data import run_tokenizer

    out = _required_out()
    if storage.is_remote(out):  # SentencePiece writes locally; copy the model up afterwards
        with tempfile.TemporaryDirectory() as tmp:
            tok = run_tokenizer.train_tokenizer(config, specs, Path(tmp) / "tokenizer.model")
            storage.write_bytes(out, tok.path.read_bytes())
    else:
        tok = run_tokenizer.train_tokenizer(config, specs, out)
    print(
        f"wrote {out}: {tok.vocab_size} {config.data.tokenizer_type} pieces, sha256 "
        f"{tok.sha256}; use it with --config.data.tokenizer={out}"
    )


def _prepare(config, specs) -> None:
    from jaxlm import storage
    from jaxlm.data import prepare, run_tokenizer
    from jaxlm.data.clean import CleanConfig
    from jaxlm.data.readers import ReadOptions

    out = _required_out()
    if any(s.kind == "prepared" for s in specs):
        raise ValueError("data.source is already prepared; prepare the original sources instead")
    tok = run_tokenizer.resolve_tokenizer(config, specs)
    if config.task.objective in EXAMPLE_OBJECTIVES:
        _prepare_examples(config, tok, out)
        return
    opts, clean_cfg = ReadOptions.from_config(config.data), CleanConfig.from_config(config.data)
    entries = []
    for i, spec in enumerate(specs):
        directory = out if len(specs) == 1 else storage.join(out, f"{i}-{spec.slug}")
        manifest = prepare.prepare_source(
            spec, directory, tok, opts, clean_cfg, shard_tokens=FLAGS.shard_tokens, progress=True
        )
        tokens = {k: v["num_tokens"] for k, v in manifest["splits"].items()}
        print(f"wrote {directory}: {tokens} tokens, tokenizer sha256 {tok.sha256[:12]}")
        weight = f"@{spec.weight:g}" if len(specs) > 1 else ""
        entries.append(f"prepared:{directory}{weight}")
    print(f"train on it with --config.data.source={','.join(entries)}")


def _prepare_examples(config, tok, out: str) -> None:
    """Example tasks: the tokenized example cache under --out (used as data.cache_dir), and the
    tokenizer beside it, so a multi-host job can read both from shared storage."""
    from jaxlm import storage
    from jaxlm.data import example_cache

    config.data.cache_dir = out
    directory, manifest = example_cache.build_cache(config, tok)
    tok_path = storage.join(out, "tokenizer.model")
    storage.write_bytes(tok_path, tok.path.read_bytes())
    counts = {k: v["examples"] for k, v in manifest["splits"].items()}
    print(f"wrote {directory}: {counts} examples, tokenizer sha256 {tok.sha256[:12]}")
    print(f"train on it with --config.data.cache_dir={out} --config.data.tokenizer={tok_path}")


def _inspect(config, specs) -> None:
    from jaxlm.data import diagnostics, run_tokenizer, source

    tok = run_tokenizer.resolve_tokenizer(config, specs)
    text = source.TextData(config, tok, specs)
    print(diagnostics.describe_rows(text, FLAGS.split, FLAGS.step, FLAGS.rows))


def _bench(config, specs) -> None:
    from jaxlm.data import diagnostics

    del specs
    result = diagnostics.bench(config, steps=FLAGS.steps)
    print(json.dumps({"config": FLAGS.config, "overrides": _OVERRIDES, **result}), flush=True)


def _required_out() -> str:
    if not FLAGS.out:
        raise ValueError("--out is required for this command")
    return FLAGS.out


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)
    from jaxlm import config as config_lib
    from jaxlm.data import readers

    command = argv[1] if len(argv) == 2 else None
    if command not in COMMANDS or not FLAGS.config:
        common.fail(
            PROGRAM,
            ValueError(f"usage: {PROGRAM} {{{'|'.join(COMMANDS)}}} --config FILE [flags]"),
        )
    try:
        config = config_lib.load_config(FLAGS.config, _OVERRIDES)
        specs = readers.parse_sources(config.data.source)
        if specs[0].kind == "synthetic":
            raise ValueError("data.source=synthetic has no text; choose a text source")
        if command in ("inspect", "bench") and config.task.objective in EXAMPLE_OBJECTIVES:
            raise ValueError(
                f"{PROGRAM} {command} reads documents, and task.objective="
                f"{config.task.objective} reads labelled examples: `{PROGRAM} prepare` builds "
                "their cache, and jaxlm-train writes their length statistics to WORKDIR/data.json"
            )
        {"tokenizer": _tokenizer, "prepare": _prepare, "inspect": _inspect, "bench": _bench}[
            command
        ](config, specs)
    except common.USER_ERRORS as e:
        common.fail(PROGRAM, e)


def run() -> None:
    app.run(main, flags_parser=common.make_flags_parser(_OVERRIDES, __name__))


if __name__ == "__main__":
    run()
