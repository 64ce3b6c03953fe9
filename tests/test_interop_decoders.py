"""GPT-2 and LLaMA from and to Hugging Face: parity with transformers (logits, cached decoding),
export that transformers loads (fp32, bf16, sharded), bit-identical round trips, fine-tuning an
imported model, and the one-line errors. Models are random-init, every tensor perturbed (HF
starts biases and norm scales at 0 and 1, which would hide swapped tensors), saved offline."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import tokenizers
from flax import nnx
from reference_libs import torch, transformers
from safetensors import safe_open
from tokenizers import decoders, models, pre_tokenizers, trainers

from jaxlm import config as config_lib
from jaxlm import inference, interop, train
from jaxlm.decode_settings import SamplingSettings
from jaxlm.inference import LanguageModel
from jaxlm.interop import convert, hf_files

ROOT = Path(__file__).resolve().parents[1]
# One device: these models' parameters are replicated anyway, and 8 fake devices would compile
# SPMD programs and run every step 8 times over on 2 cores.
ONE = jax.devices()[:1]
TEXT = [
    "def f(x):\n    return x ** 2\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
    "Café crème brûlée, São Paulo, Ærø; 東京は日本の首都です。",
    "import os\nprint(os.path.join('a', 'b'))\n",
    "class A:\n    def __init__(self):\n        self.x = [1, 2, 3]\n",
]
# kind -> (transformers config, where the tokenizer goes: tokenizer.json, GPT-2 files or none)
CASES = {
    "gpt2": (
        lambda v: transformers.GPT2Config(
            n_embd=64, n_layer=2, n_head=4, vocab_size=v, n_positions=128, bos_token_id=0,
            eos_token_id=0, layer_norm_epsilon=1e-5,
        ),
        "vocab.json",
    ),
    "llama": (  # grouped-query attention, untied head, head_dim != hidden / heads
        lambda v: transformers.LlamaConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, intermediate_size=96, vocab_size=v, max_position_embeddings=256,
            rope_theta=500.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0,
            eos_token_id=0,
        ),
        "tokenizer.json",
    ),
    "llama_tied": (
        lambda v: transformers.LlamaConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            intermediate_size=96, vocab_size=v, max_position_embeddings=128,
            tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
        ),
        None,
    ),
}  # fmt: skip


@dataclasses.dataclass
class Case:
    kind: str
    hf: torch.nn.Module
    hf_dir: Path
    run_dir: Path
    lm: LanguageModel


@pytest.fixture(scope="module")
def bpe() -> tokenizers.Tokenizer:
    """A tiny GPT-2 style byte-level BPE."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXT * 4, trainer)
    return tok


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def save_hf(kind: str, bpe: tokenizers.Tokenizer, out: Path) -> torch.nn.Module:
    make, tok_file = CASES[kind]
    torch.manual_seed(0)
    model = perturbed(transformers.AutoModelForCausalLM.from_config(make(bpe.get_vocab_size())))
    model.save_pretrained(out)
    if tok_file == "tokenizer.json":
        bpe.save(str(out / "tokenizer.json"))
    elif tok_file == "vocab.json":
        bpe.model.save(str(out))  # vocab.json + merges.txt, as the Hub's gpt2 has them
    return model


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "jaxlm.cli.convert", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def imported(tmp_path_factory, bpe):
    """kind -> Case, each converted once for the whole module."""
    made: dict[str, Case] = {}

    def get(kind: str) -> Case:
        if kind not in made:
            tmp = tmp_path_factory.mktemp(kind)
            hf = save_hf(kind, bpe, tmp / "hf")
            if kind == "gpt2":  # through the command line once
                r = cli("import", "--hf_dir", str(tmp / "hf"), "--workdir", str(tmp / "run"))
                assert r.returncode == 0 and "wrote" in r.stdout, r.stderr[-2000:]
            else:
                assert interop.import_hf(tmp / "hf", tmp / "run") == tmp / "run"
            made[kind] = Case(
                kind, hf, tmp / "hf", tmp / "run", LanguageModel.load(tmp / "run", devices=ONE)
            )
        return made[kind]

    return get


@pytest.fixture(scope="module", params=list(CASES))
def case(request, imported) -> Case:
    return imported(request.param)


def batch(vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """4 rows of 128 tokens, the last right-padded after 90: (tokens, attention mask)."""
    tokens = np.random.default_rng(0).integers(1, vocab, (4, 128)).astype(np.int32)
    mask = np.ones_like(tokens)
    tokens[3, 90:], mask[3, 90:] = 0, 0
    return tokens, mask


def hf_logits(model: torch.nn.Module, tokens: np.ndarray, mask=None) -> np.ndarray:
    with torch.no_grad():
        kwargs = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return model(torch.tensor(tokens, dtype=torch.long), **kwargs).logits.numpy()


def forward(lm: LanguageModel, tokens: np.ndarray) -> np.ndarray:
    """jaxlm's logits, compiled (op-by-op dispatch is far slower than one compile)."""
    graphdef = lm.state.graphdef
    return np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(lm.params, tokens))


def test_logits_match_transformers(case):
    tokens, mask = batch(case.lm.state.model_cfg.vocab_size)
    ours = forward(case.lm, tokens)
    ref = hf_logits(case.hf, tokens, mask)
    real = mask.astype(bool)
    assert np.abs(ours - ref)[real].max() < 1e-4
    assert (ours.argmax(-1) == ref.argmax(-1))[real].all()
    # In memory, without a run directory: the same parameters, bit for bit.
    direct = LanguageModel.from_pretrained(case.hf_dir, devices=ONE)
    for a, b in zip(jax.tree.leaves(direct.params), jax.tree.leaves(case.lm.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (direct.tokenizer is None) == (CASES[case.kind][1] is None)


def test_cached_decoding_matches_transformers(case):
    lm = case.lm
    tokens = batch(lm.state.model_cfg.vocab_size)[0][:, :40]
    ref = hf_logits(case.hf, tokens)
    graphdef = lm.state.graphdef

    @jax.jit
    def decode(params, tokens_BT, cache, index_B):
        return nnx.merge(graphdef, params).decode(tokens_BT, cache, index_B)

    cache = lm.model.init_cache(4, 40)
    steps = []
    for t in range(40):  # one token at a time through the KV cache (generate_ids prefills)
        logits, cache = decode(lm.params, tokens[:, t : t + 1], cache, jnp.full(4, t, jnp.int32))
        steps.append(logits)
    assert np.abs(np.concatenate(steps, axis=1) - ref).max() < 1e-4
    if case.kind == "llama_tied":
        return  # the sampling loop is the same as the untied model's
    # Greedy sampling (jaxlm.generate) from prompts of different lengths follows HF's argmax.
    prompts = [list(tokens[0, :5]), list(tokens[1, :9])]
    out = lm.generate_ids(prompts, SamplingSettings(max_new_tokens=6, temperature=0.0))
    for prompt, new in zip(prompts, out, strict=True):
        full = np.asarray([prompt + new])
        assert list(hf_logits(case.hf, full)[0, len(prompt) - 1 : -1].argmax(-1)) == new


EXPORTS = {  # kind -> export options: bf16 in one file, fp32 in shards, fp32 in one file
    "gpt2": {"dtype": "bfloat16"},
    "llama": {"max_shard_size": "40KB"},
    "llama_tied": {},
}


def test_export_loads_in_transformers_and_round_trips(case, tmp_path):
    out = interop.export_hf(case.run_dir, tmp_path / "out", **EXPORTS[case.kind])
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"]) == (set(), set())
    assert type(hf).__name__ == type(case.hf).__name__
    _, _, params, _ = convert.run_params(case.run_dir)
    back = interop.load_hf(out)[1]
    bf16 = EXPORTS[case.kind].get("dtype") == "bfloat16"
    if bf16:  # every tensor is bf16 on disk and is the parameter rounded to bf16
        files = hf_files.weight_files(out)
        with safe_open(str(files[0]), framework="numpy") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {np.dtype(ml_dtypes.bfloat16)}
        params = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), params)
    else:
        shards = len(hf_files.weight_files(out))
        assert (shards > 1) == ("max_shard_size" in EXPORTS[case.kind]), shards
    # jaxlm -> HF -> jaxlm: the same parameters, bit for bit (sharded import included).
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(a, b)
    tokens, mask = batch(case.lm.state.model_cfg.vocab_size)
    ref = hf_logits(case.hf, tokens, mask)
    got = hf_logits(hf.float(), tokens, mask)
    assert np.abs(got - ref)[mask.astype(bool)].max() < (5e-2 if bf16 else 1e-4)
    if case.lm.tokenizer is not None:  # the tokenizer goes along and encodes the same
        tok = transformers.AutoTokenizer.from_pretrained(out)
        for text in TEXT:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert ids == case.lm.tokenizer.encode(text)


def finetune_config(run_dir: Path, text_file: Path, cache: Path):
    c = config_lib.load_run_config(run_dir)
    c.data.source, c.data.cache_dir = f"file:{text_file}", str(cache)
    c.data.batch_size, c.data.seq_len, c.data.eval_fraction = 8, 32, 0.2
    c.train.init_from, c.train.steps, c.train.checkpoint_every = str(run_dir), 4, 2
    c.train.eval_every, c.train.eval_steps, c.train.log_every = 0, 1, 1
    c.optim.warmup_steps = 1
    return c


def test_imported_gpt2_evaluates_fine_tunes_resumes_and_exports(tmp_path, imported, capsys):
    gpt2 = imported("gpt2")
    run = gpt2.run_dir
    text_file = tmp_path / "text.txt"
    text_file.write_text("\n\n".join(TEXT * 20))
    c = finetune_config(run, text_file, tmp_path / "cache")
    # jaxlm-eval's program on the imported run, on other data.
    overrides = [f"data.source={c.data.source}", f"data.cache_dir={c.data.cache_dir}"]
    overrides += ["data.batch_size=8", "data.seq_len=32", "data.eval_fraction=0.2"]
    record = inference.evaluate_run(run, max_batches=1, overrides=overrides, devices=ONE)
    assert record["step"] == 0 and np.isfinite(record["bits_per_byte"])
    # Fine-tune with init_from: interrupted at step 2 and resumed, against straight through.
    c.train.stop_at = 2
    train.train(c, tmp_path / "tuned", ONE)
    log = capsys.readouterr().out  # every parameter comes from the imported run, none is new
    assert f"loaded {len(jax.tree.leaves(gpt2.lm.params))} parameters\n" in log, log
    c.train.stop_at = 0
    resumed = train.train(c, tmp_path / "tuned", ONE)
    straight = train.train(
        finetune_config(run, text_file, tmp_path / "cache"), tmp_path / "once", ONE
    )
    assert resumed == straight
    tuned = LanguageModel.load(tmp_path / "tuned", devices=ONE)
    out = interop.export_hf(tmp_path / "tuned", tmp_path / "out")
    back, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"]) == (set(), set())
    tokens = batch(tuned.state.model_cfg.vocab_size)[0][:, :32]
    ours = forward(tuned, tokens)
    assert np.abs(hf_logits(back, tokens) - ours).max() < 1e-4
    assert np.abs(hf_logits(gpt2.hf, tokens) - ours).max() > 1e-3  # it did train


def edited(src: Path, dst: Path, **changes) -> Path:
    """A copy of an HF folder with config.json keys changed."""
    shutil.copytree(src, dst)
    hf = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**hf, **changes}))
    return dst


@pytest.fixture(scope="module")
def folders(tmp_path_factory, bpe) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("errors")
    for kind in ("gpt2", "llama"):
        save_hf(kind, bpe, tmp / kind)
    return {"gpt2": tmp / "gpt2", "llama": tmp / "llama"}


@pytest.mark.parametrize(
    "kind,changes,message",
    [
        ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ("gpt2", {"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn=True"),
        ("gpt2", {"activation_function": "silu"}, "activation_function='silu'"),
        ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
        ("llama", {"rope_parameters": {"rope_type": "yarn"}}, "rope_parameters.rope_type"),
        ("llama", {"attention_bias": True}, "attention_bias=True"),
        ("llama", {"mlp_bias": True}, "mlp_bias=True"),
        ("llama", {"architectures": ["LlamaForSequenceClassification"]}, "architectures="),
        ("gpt2", {"architectures": None, "model_type": "opt"}, "model_type='opt'"),
    ],
)
def test_unsupported_configs_are_one_line_errors(folders, tmp_path, kind, changes, message):
    src = edited(folders[kind], tmp_path / "hf", **changes)
    with pytest.raises(interop.ConversionError, match="config.json") as e:
        interop.import_hf(src, tmp_path / "run")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # nothing written


def test_tensor_and_directory_errors(folders, tmp_path, monkeypatch):
    src = edited(folders["gpt2"], tmp_path / "extra")
    tensors = hf_files.read_tensors(src)
    tensors["transformer.h.0.attn.q_norm.weight"] = np.ones(4, np.float32)
    hf_files.write_tensors(src, tensors)
    with pytest.raises(interop.ConversionError, match="unexpected tensor.*q_norm"):
        interop.load_hf(src)
    del tensors["transformer.h.0.attn.q_norm.weight"], tensors["transformer.h.1.ln_2.bias"]
    hf_files.write_tensors(src, tensors)
    with pytest.raises(interop.ConversionError, match="'transformer.h.1.ln_2.bias' is missing"):
        interop.load_hf(src)
    (tmp_path / "taken").mkdir()
    with pytest.raises(interop.ConversionError, match="taken exists"):
        interop.import_hf(folders["llama"], tmp_path / "taken")
    # A failure while writing (here the checkpoint) leaves no run directory, no partial one.
    monkeypatch.setattr(convert.Checkpointer, "save", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        interop.import_hf(folders["llama"], tmp_path / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["extra", "taken"]


def test_hub_gpt2_layout_without_prefix_or_mask_buffers(folders, tmp_path):
    """The Hub's gpt2 was saved from GPT2Model: no 'transformer.' prefix, causal-mask buffers."""
    src = edited(folders["gpt2"], tmp_path / "hub")
    tensors = {k.removeprefix("transformer."): v for k, v in hf_files.read_tensors(src).items()}
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 8, 8), np.float32))
    tensors["h.1.attn.masked_bias"] = np.asarray(-1e4, np.float32)
    hf_files.write_tensors(src, tensors, max_shard_size=10_000)
    want, got = interop.load_hf(folders["gpt2"])[1], interop.load_hf(src)[1]
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(a, b)


def test_cli_usage_errors_exit_2(tmp_path):
    r = cli("export", "--workdir", str(tmp_path))
    assert r.returncode == 2 and "export needs --out" in r.stderr, r.stderr
    r = cli("convert", "--workdir", str(tmp_path))
    assert r.returncode == 2 and "usage: jaxlm-convert import|export" in r.stderr, r.stderr
