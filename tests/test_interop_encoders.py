"""BERT and DistilBERT in and out of jaxlm, against transformers on PyTorch CPU.

Each architecture is built once (random init, every parameter perturbed so that no LayerNorm
scale is 1 and no bias 0), saved with a WordPiece tokenizer, imported and exported; the tests
share those folders. Nothing downloads.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference_libs import torch, transformers

from jaxlm import config as config_lib
from jaxlm import state, train
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.interop import ConversionError, bert, convert, export_hf, import_hf, load_hf

# One device: 8 fake ones would compile SPMD programs and run each step 8 times on 2 cores.
ONE = jax.devices()[:1]

WORDS = "the cat sat on a mat good bad film movie plot was very not dull great and it".split()
PIECES = ["##s", "##ing", "##ed", "##ly", *"abcdefghijklmnopqrstuvwxyz", "!", ".", ","]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *PIECES]
V, T = 128, 128  # model vocabulary (the tokenizer's ids are a prefix of it), sequence length
BERT_SHAPE = dict(
    vocab_size=V,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=T,
)
DISTIL_SHAPE = dict(
    vocab_size=V, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=T
)
# architecture -> HF config; DistilBERT's MLM projection is untied, to cover model.lm_head.
ARCHS = {
    "BertForMaskedLM": lambda: transformers.BertConfig(**BERT_SHAPE),
    "BertForSequenceClassification": lambda: transformers.BertConfig(**BERT_SHAPE, num_labels=2),
    "DistilBertForMaskedLM": lambda: transformers.DistilBertConfig(
        **DISTIL_SHAPE, tie_word_embeddings=False
    ),
    "DistilBertForSequenceClassification": lambda: transformers.DistilBertConfig(
        **DISTIL_SHAPE, num_labels=3
    ),
}
LENGTHS = np.array([T, T, 77, T])  # row 2 is right-padded


def hf_inputs(arch: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    mask = (np.arange(T)[None] < LENGTHS[:, None]).astype(np.int64)
    out = {"input_ids": rng.integers(5, V, (4, T)) * mask, "attention_mask": mask}
    if arch.startswith("Bert"):
        out["token_type_ids"] = (np.arange(T)[None] >= 40) * mask  # sentence B from 40 on
    return out


def hf_logits(model, inputs: dict) -> np.ndarray:
    with torch.no_grad():
        return model(**{k: torch.as_tensor(v) for k, v in inputs.items()}).logits.numpy()


def jaxlm_logits(cfg, params, inputs: dict) -> np.ndarray:
    """MLM logits [B, T, V] or class logits [B, C], as transformers computes them."""
    graphdef = state.abstract_model(cfg)[0]
    types = inputs.get("token_type_ids")

    @jax.jit
    def run(p, ids, seg, types):
        model = nnx.merge(graphdef, p)
        fn = model.classify if cfg.num_classes else model
        return fn(ids, token_types_BT=types, segment_ids_BT=seg)

    as_int = lambda x: None if x is None else jnp.asarray(x, jnp.int32)
    args = (inputs["input_ids"], inputs["attention_mask"], types)
    return np.asarray(run(params, *map(as_int, args)))


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def assert_matches(arch: str, got: np.ndarray, want: np.ndarray) -> None:
    """MLM: logits within 1e-4 at real positions, same argmax; classifiers: probabilities 1e-5."""
    if bert.ARCHITECTURES[arch] == "classify":
        np.testing.assert_allclose(softmax(got), softmax(want), atol=1e-5, rtol=0)
        np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
        return
    real = np.arange(T)[None] < LENGTHS[:, None]
    assert np.abs(got - want)[real].max() < 1e-4
    np.testing.assert_array_equal(got.argmax(-1)[real], want.argmax(-1)[real])


def save_tokenizer(folder) -> transformers.PreTrainedTokenizerBase:
    tok = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)})
    tok.save_pretrained(folder)
    return tok


class Imported:
    """One architecture: its HF model and folder, the imported run and its parameters."""

    def __init__(self, arch: str, root):
        self.arch, self.root = arch, root
        torch.manual_seed(len(arch))
        self.hf_model = getattr(transformers, arch)(ARCHS[arch]()).eval()
        with torch.no_grad():
            for p in self.hf_model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        self.hf_dir, self.run_dir = root / "hf", root / "run"
        self.hf_model.save_pretrained(self.hf_dir)
        self.hf_tok = save_tokenizer(self.hf_dir)
        import_hf(self.hf_dir, self.run_dir)
        self.config, self.cfg, self.params, self.tok = convert.run_params(self.run_dir)
        self.inputs = hf_inputs(arch)
        self.want = hf_logits(self.hf_model, self.inputs)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    cache: dict[str, Imported] = {}

    def get(arch: str) -> Imported:
        if arch not in cache:
            cache[arch] = Imported(arch, tmp_path_factory.mktemp(arch))
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", list(ARCHS))
def test_import_matches_transformers(imported, arch):
    m = imported(arch)
    objective = bert.ARCHITECTURES[arch]
    assert m.config.task.objective == objective and m.config.model.family == "encoder"
    assert_matches(arch, jaxlm_logits(m.cfg, m.params, m.inputs), m.want)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_export_loads_in_transformers_and_round_trips(imported, arch, tmp_path):
    m = imported(arch)
    auto = getattr(transformers, arch)
    out = export_hf(m.run_dir, tmp_path / "fp32", max_shard_size="40KB")
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) > 1
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert json.loads((out / "config.json").read_text())["architectures"] == [arch]
    model, info = auto.from_pretrained(out, output_loading_info=True)
    assert {k: list(v) for k, v in info.items()} == {
        "missing_keys": [],
        "unexpected_keys": [],
        "mismatched_keys": [],
        "error_msgs": [],
    }
    assert_matches(arch, hf_logits(model.eval(), m.inputs), m.want)
    # jaxlm -> HF -> jaxlm: bit-identical parameters.
    _, again = load_hf(out)
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(m.params)[0], jax.tree.leaves(again), strict=True
    ):
        assert a.dtype == b.dtype and np.array_equal(a, b), jax.tree_util.keystr(path)
    # bfloat16 tensors load, equal to the parameters rounded to bfloat16.
    out16 = export_hf(m.run_dir, tmp_path / "bf16", dtype="bfloat16")
    model16, info = auto.from_pretrained(out16, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for name, p16 in model16.state_dict().items():
        assert p16.dtype == torch.bfloat16, name
        assert torch.equal(p16, model.state_dict()[name].to(torch.bfloat16)), name


def test_wordpiece_tokenizer_and_its_special_ids_are_carried(imported, tmp_path):
    m = imported("BertForMaskedLM")
    roles = ("mask", "cls", "sep", "pad", "unk")
    assert {r: getattr(m.tok, f"{r}_id") for r in roles} == {
        r: getattr(m.hf_tok, f"{r}_token_id") for r in roles
    }
    text = "the cats sat on a mat, good filmed plot!"
    assert m.tok.encode(text) == m.hf_tok(text, add_special_tokens=False)["input_ids"]
    assert m.config.data.tokenizer == "" and tokenizer_lib.run_file(m.run_dir).is_file()
    out = export_hf(m.run_dir, tmp_path / "out")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert [getattr(tok, f"{r}_token_id") for r in roles] == [
        getattr(m.hf_tok, f"{r}_token_id") for r in roles
    ]
    assert tok(text)["input_ids"] == m.hf_tok(text)["input_ids"]
    assert json.loads((out / "config.json").read_text())["pad_token_id"] == 0


def test_unsupported_configs_are_one_line_errors(imported, tmp_path):
    m = imported("BertForMaskedLM")
    hf = json.loads((m.hf_dir / "config.json").read_text())
    cases = [
        ("BertForMaskedLM", {"position_embedding_type": "relative_key"}, "position_embedding_type"),
        ("BertForMaskedLM", {"hidden_act": "silu"}, "hidden_act='silu'"),
        ("BertForMaskedLM", {"is_decoder": True}, "is_decoder=True"),
        ("BertForSequenceClassification", {"problem_type": "regression"}, "problem_type"),
        ("DistilBertForMaskedLM", {"sinusoidal_pos_embds": True}, "sinusoidal_pos_embds"),
    ]
    distil = json.loads((imported("DistilBertForMaskedLM").hf_dir / "config.json").read_text())
    for arch, change, needle in cases:
        base = distil if arch.startswith("Distil") else hf
        with pytest.raises(ConversionError, match=needle) as e:
            bert.config_from_hf({**base, **change}, arch)
        assert "\n" not in str(e.value)
    # A failed import leaves nothing behind.
    bad = tmp_path / "bad"
    shutil.copytree(m.hf_dir, bad)
    (bad / "config.json").write_text(json.dumps({**hf, "position_embedding_type": "relative_key"}))
    with pytest.raises(ConversionError, match="position_embedding_type='relative_key'"):
        import_hf(bad, tmp_path / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]
    # Export refuses what BERT cannot represent, naming the key.
    pre = dataclasses.replace(m.cfg, block_norm="pre")
    with pytest.raises(ConversionError, match="model.block_norm='pre': BertForMaskedLM needs"):
        bert.config_to_hf(pre, "BertForMaskedLM", {})


def test_imported_classifier_fine_tunes_resumes_and_exports(imported, tmp_path, capsys):
    m = imported("BertForSequenceClassification")
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(120):
        words = list(rng.choice(WORDS, int(rng.integers(3, 9))))
        rows.append({"text": " ".join(words), "label": int("good" in words or "great" in words)})
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [
        f"train.init_from={m.run_dir}",
        f"data.source=jsonl:{tmp_path}/data.jsonl",
        f"data.cache_dir={tmp_path}/cache",
        "data.seq_len=16",
        "data.batch_size=8",
        "data.eval_fraction=0.2",
        "train.steps=4",
        "train.checkpoint_every=2",
        "train.eval_every=0",
        "train.eval_steps=1",
        "train.log_every=2",
        "optim.warmup_steps=1",
    ]
    config = config_lib.load_config(m.run_dir / "config.json", overrides)
    full = train.train(config, tmp_path / "full", ONE)
    out = capsys.readouterr().out
    assert f"init_from {m.run_dir} step 0: loaded" in out and "new:" not in out
    # A run stopped after its step-2 checkpoint (a copy without the later one) resumes exactly.
    shutil.copytree(tmp_path / "full", tmp_path / "split")
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "4")
    rest = train.train(config, tmp_path / "split", ONE)
    assert rest["step"] == 4 and rest["eval/loss"] == full["eval/loss"]
    assert "init_from" not in capsys.readouterr().out  # resuming reads its own checkpoint
    _, cfg, tuned, _ = convert.run_params(tmp_path / "full")
    resumed = convert.run_params(tmp_path / "split")[2]
    for a, b in zip(jax.tree.leaves(tuned), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    moved = tuned["classifier"]["out"]["kernel"] - m.params["classifier"]["out"]["kernel"]
    assert np.abs(moved).max() > 1e-4
    # Exported again, transformers computes the fine-tuned model's probabilities.
    exported = export_hf(tmp_path / "full", tmp_path / "hf")
    model, info = transformers.BertForSequenceClassification.from_pretrained(
        exported, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    got = jaxlm_logits(cfg, tuned, m.inputs)
    assert_matches(m.arch, got, hf_logits(model.eval(), m.inputs))
