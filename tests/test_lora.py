"""LoRA (jaxlm/compress/lora.py): adapters on a frozen base run, only they train and are saved,
a merge command writes a plain run."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from jax.sharding import Mesh

from jaxlm import config as config_lib
from jaxlm import train
from jaxlm.checkpoint import Checkpointer
from jaxlm.compress import lora, paths, peft_export
from jaxlm.config import ConfigError
from jaxlm.finetune import flat_params
from jaxlm.inference import LanguageModel, evaluate_run
from jaxlm.interop import convert
from jaxlm.state import ModelState

RANK = 4


def lora_config(base: Path, steps: int = 4):
    c = tiny_config(source="python_stdlib")
    c.data.cache_dir = str(base.parent / "cache")  # the base run's tokenizer and caches
    c.data.tokenizer_vocab_size = 512
    c.model.vocab_size = 0
    c.model.max_len = c.data.seq_len = 32
    c.train.init_from = str(base)
    c.train.lora_rank, c.train.lora_alpha = RANK, 8.0
    c.train.lora_targets = "attn/query,attn/value"
    c.train.steps, c.train.checkpoint_every, c.train.eval_every = steps, 2, 0
    c.optim.lr = 3e-2
    return c


def restored(workdir: Path, step: int) -> dict:
    """A run's saved train state at `step`, as numpy."""
    ckpt = Checkpointer(Path(workdir) / "checkpoints")
    try:
        item = ckpt.manager.restore(step)
    finally:
        ckpt.close()
    return jax.tree.map(np.asarray, {"params": item["params"], **item["train_state"]})


@pytest.fixture(scope="module")
def lora_run(stdlib_lm_run, tmp_path_factory):
    """4 LoRA steps on the shared 4-step stdlib run, checkpoints at 2 and 4."""
    workdir = tmp_path_factory.mktemp("lora") / "run"
    train.train(lora_config(stdlib_lm_run), workdir)
    return workdir


def test_fresh_adapters_leave_the_base_exactly(stdlib_lm_run, tmp_path):
    s = train.setup(lora_config(stdlib_lm_run), tmp_path / "fresh")
    state = train.create_state(s)
    s.base = lora.load_base(str(stdlib_lm_run), s.model, s.data.tokenizer_sha256)
    merged = s.model_params(state["params"])
    for name, leaf in flat_params(merged).items():
        np.testing.assert_array_equal(leaf, flat_params(s.base)[name], err_msg=name)
    tokens = jnp.asarray(s.data.train_batch(0)["inputs"])
    with s.model.rules_context():
        np.testing.assert_array_equal(s.model.merge(merged)(tokens), s.model.merge(s.base)(tokens))
    # Trainable count: rank x (in + out) per adapted kernel; query 32 -> 4x8, value 32 -> 2x8.
    want = 2 * (RANK * (32 + 32) + RANK * (32 + 16))
    assert s.lora.num_trainable() == want
    assert sum(x.size for x in jax.tree.leaves(state["params"])) == want
    assert [t.name for t in s.lora.targets] == [
        f"blocks/{i}/attn/{k}" for i in range(2) for k in ("query", "value")
    ]


def test_only_adapters_train_and_are_saved(stdlib_lm_run, lora_run):
    base = restored(stdlib_lm_run, 4)["params"]
    state = restored(lora_run, 4)
    names = set(flat_params(state["params"]))
    assert names == {
        f"blocks/{i}/attn/{k}/lora_{ab}"
        for i in range(2)
        for k in ("query", "value")
        for ab in "ab"
    }
    assert any(
        np.abs(x).max() > 0 for n, x in flat_params(state["params"]).items() if "lora_b" in n
    )
    # Optimizer state: Adam's moments for the adapters and nothing else.
    moments = [x for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) > 0]
    assert len(moments) == 2 * len(names)
    assert sorted(x.shape for x in moments) == sorted(
        2 * [x.shape for x in flat_params(state["params"]).values()]
    )
    # The base run is untouched, and the base the LoRA run restores is bit-identical to it.
    s = train.setup(lora_config(stdlib_lm_run), lora_run)
    # Adam's moments are laid out as their adapters are.
    name = "blocks/0/attn/query/lora_a"
    moments = [
        sh for n, sh in flat_params(s.state_shardings["opt_state"]).items() if n.endswith(name)
    ]
    assert len(moments) == 2 and all(sh == flat_params(s.lora.shardings)[name] for sh in moments)
    again = lora.load_base(str(stdlib_lm_run), s.model, s.data.tokenizer_sha256)
    for name, leaf in flat_params(again).items():
        np.testing.assert_array_equal(np.asarray(leaf), flat_params(base)[name], err_msg=name)
    assert restored(stdlib_lm_run, 4)["step"] == 4


def test_resume_is_exact(stdlib_lm_run, lora_run, tmp_path):
    c = lora_config(stdlib_lm_run)
    c.train.stop_at = 2
    train.train(c, tmp_path / "run")
    c.train.stop_at = 0
    train.train(c, tmp_path / "run")
    a, b = restored(lora_run, 4), restored(tmp_path / "run", 4)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_merge_matches_the_adapter_forward(lora_run):
    _, plan, adapters, base, ms, _, _ = lora.restore_run(lora_run)
    merged = lora.merge(base, adapters, plan)
    x = jax.random.normal(jax.random.key(0), (3, 5, 32))
    for t in plan.targets:
        w, ad = paths.at(base, t.path)["kernel"], paths.at(adapters, t.path)
        # The LoRA forward as written: x W + (alpha / r) (x A) B, never forming A B.
        xa = jnp.einsum("btd,dr->btr", x, ad["lora_a"])
        want = jnp.einsum("btd,dnh->btnh", x, w) + plan.scale * jnp.einsum(
            "btr,rnh->btnh", xa, ad["lora_b"]
        )
        got = jnp.einsum("btd,dnh->btnh", x, paths.at(merged, t.path)["kernel"])
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        assert float(jnp.abs(got - jnp.einsum("btd,dnh->btnh", x, w)).max()) > 1e-4


def test_merge_run_writes_a_plain_run(lora_run, tmp_path):
    out = tmp_path / "merged"
    result = lora.merge_run(lora_run, out)
    assert result["step"] == 4 and len(result["merged"]) == 4
    config = config_lib.load_run_config(out)
    assert config.train.lora_rank == 0 and config.train.init_from == ""
    metrics = evaluate_run(out, max_batches=2)
    _, plan, adapters, base, ms, _, _ = lora.restore_run(lora_run)
    lm = LanguageModel.load(out)
    tokens = jnp.asarray([[5, 9, 11, 3, 7]])
    want = ms.merge(lora.merge(base, adapters, plan))(tokens)
    np.testing.assert_allclose(lm.state.merge(lm.params)(tokens), want, atol=1e-6, rtol=0)
    assert np.isfinite(metrics["bits_per_byte"])
    assert lm.generate(["def "], max_new_tokens=4, temperature=0.0)
    # The LoRA run itself evaluates and generates as its merge does (adapters merged on load).
    direct = evaluate_run(lora_run, max_batches=2)
    assert abs(direct["bits_per_byte"] - metrics["bits_per_byte"]) < 1e-6
    direct_lm = LanguageModel.load(lora_run)
    got = direct_lm.state.merge(direct_lm.params)(tokens)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="already exists"):
        lora.merge_run(lora_run, out)


def test_adapter_checkpoint_is_small_on_pylm_tiny(tmp_path, one_device):
    """Saved train state (params + Adam's two moments) of pylm_tiny's shape, random values so
    compression cannot help: full model vs rank-8 adapters on query and value."""
    c = config_lib.load_config(Path(__file__).parents[1] / "experiments" / "pylm_tiny.py")
    c.train.lora_rank, c.train.lora_alpha, c.train.init_from = 8, 16.0, "base"
    ms = ModelState.build(
        config_lib.model_config(c, 2048), Mesh(np.array(one_device), ("data",)), ()
    )
    rng = np.random.default_rng(0)
    sizes = {}
    for name, abstract in (("base", ms.abstract), ("lora", lora.make_plan(c.train, ms).abstract)):
        params = jax.tree.map(lambda a: rng.standard_normal(a.shape, np.float32), abstract)
        ckpt = Checkpointer(tmp_path / name, async_save=False)
        ckpt.save(1, {"params": params, "opt_state": [params, params]}, {})
        ckpt.close()
        sizes[name] = paths.dir_bytes(tmp_path / name)
    assert sizes["lora"] < 0.05 * sizes["base"], sizes


def test_bad_settings_are_one_line_errors(stdlib_lm_run, tmp_path):
    cases = [
        (dict(lora_targets="attn/nothing"), "train.lora_targets pattern 'attn/nothing' matches"),
        (dict(lora_rank=17), r"train.lora_rank=17 must be in \[1, 16\]: blocks/0/attn/value"),
        (dict(init_from=""), "needs train.init_from"),
    ]
    for i, (change, message) in enumerate(cases):
        c = lora_config(stdlib_lm_run)
        for k, v in change.items():
            c.train[k] = v
        with pytest.raises(ConfigError, match=message):
            train.train(c, tmp_path / str(i))
        assert not (tmp_path / str(i) / "checkpoints").exists()


def test_peft_export_loads_on_the_transformers_model(tmp_path, one_device):
    """A LoRA run on a LLaMA imported from transformers, exported for peft: same logits."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch = pytest.importorskip("torch")
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=64, max_position_embeddings=64,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    convert.import_hf(tmp_path / "hf", tmp_path / "base")
    c = config_lib.load_run_config(tmp_path / "base")
    c.model.dtype, c.data.batch_size, c.data.seq_len = "float32", 8, 16
    c.train.init_from, c.train.lora_rank, c.train.lora_alpha = str(tmp_path / "base"), 4, 8.0
    c.train.lora_targets = "attn/query,attn/value,attn/out"  # out: a [heads, head_dim, d] input
    c.train.steps, c.train.checkpoint_every, c.train.eval_every, c.train.eval_steps = 2, 2, 0, 1
    c.optim.lr, c.optim.warmup_steps = 5e-2, 0
    train.train(c, tmp_path / "lora", one_device)
    result = peft_export.export_peft(tmp_path / "lora", tmp_path / "peft")
    assert result["architecture"] == "LlamaForCausalLM" and result["tensors"] == 12
    tokens = np.array([[1, 5, 9, 11, 3, 7, 2, 8]])
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "peft")(torch.tensor(tokens))
    _, plan, adapters, base, ms, _, _ = lora.restore_run(tmp_path / "lora", devices=one_device)
    ours = ms.merge(lora.merge(base, adapters, plan))(jnp.asarray(tokens))
    np.testing.assert_allclose(ours, theirs.logits.numpy(), atol=1e-4, rtol=0)
    assert float(jnp.abs(ours - ms.merge(base)(jnp.asarray(tokens))).max()) > 1e-3
