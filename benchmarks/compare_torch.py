"""jaxlm against PyTorch eager on the same CPU: train step and greedy decoding, side by side.

    python benchmarks/compare_torch.py [--sizes pylm_tiny,issue,gpt2_small] [--rounds 5]

The same GPT-2-style model (learned positions, LayerNorm with bias, tanh GELU, tied embeddings,
fp32) is built in jaxlm and as transformers' GPT2LMHeadModel with jaxlm's initial weights copied
in, so both start from the same loss and greedy decoding must emit the same tokens. Both train
the same batch with AdamW and global-norm clipping. Timing alternates between the two in one
process (a chunk of jaxlm steps, then a chunk of torch steps, `--rounds` times), so both see the
same load from other processes; each figure is the median over rounds of the per-step mean.

Prints one JSON line per size: median step times, `train_speedup` (torch ms / jaxlm ms, > 1 when
jaxlm is faster) with its spread over rounds, and per decode batch size the tokens/s of jaxlm's
compiled loop and of `transformers.generate` (prefill included in both), their ratio, and
whether the greedy tokens are identical. Decoding reads every weight once per new token, so its
tokens/s is bounded by memory bandwidth / weight bytes x batch: the row gives that bound
(`memory_bound_tokens_per_sec`) from a bandwidth measured in the same run (`memory_gb_per_s`:
what a jitted matrix-vector product over `--bandwidth_mb` of fp32 draws) and the bytes a step
reads (`decode_weight_bytes`), and the bound over torch's tokens/s (`memory_bound_speedup`): a
decode loop that reads memory no faster than that product beats torch by at most this much (at
small batches; larger ones are bound by compute first).

The row also splits each train step into its dense matrix products and the rest (`gemms`):
each library's products of the step (`step_gemms`: every weight's forward, input-gradient and
weight-gradient product, attention's own aside) timed alone at the step's shapes, jaxlm's by
XLA and GPT2LMHeadModel's by torch, and each step time less them; GPT2LMHeadModel's products
are also timed in XLA, so a gap in the products splits into XLA's kernels and jaxlm's layout.
Where jaxlm trails torch, this says whether matrix products or the rest are behind it. jaxlm's
rest is an estimate: inside a step XLA overlaps independent products, so where they are small
(the `issue` size) it comes out too low.

Threads: torch uses one intra-op thread per core (the cores this process may use, `--cores` pins
it to fewer); XLA's CPU client sizes its pool to the same cores.

This script lives outside the jaxlm package: jaxlm never imports torch.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time

import jax
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

from jaxlm import benchmark, sharding, train
from jaxlm.config import base_config, gpt2_style
from jaxlm.decode_settings import SamplingSettings
from jaxlm.generate import make_generate
from jaxlm.interop import gpt2

# name -> (layers, d_model, heads, d_ff, vocab, batch, seq_len)
SIZES = {
    "tiny": (2, 32, 2, 64, 65, 2, 16),  # the test's size (make test)
    "pylm_tiny": (4, 128, 4, 512, 2048, 32, 128),  # experiments/pylm_tiny.py's dims
    "issue": (4, 128, 4, 512, 65, 12, 64),  # issue 20's measurement
    "gpt2_small": (12, 768, 12, 3072, 50257, 1, 256),  # GPT-2 124M, one row of 256
}


def jaxlm_config(size: str, max_len: int, lr: float = 1e-4):
    layers, d, heads, ff, vocab, batch, seq = SIZES[size]
    c = base_config()
    gpt2_style(c.model)
    c.model.update(num_layers=layers, d_model=d, num_heads=heads, d_ff=ff, vocab_size=vocab)
    c.model.update(max_len=max(max_len, seq), dtype="float32")
    c.data.update(source="synthetic", batch_size=batch, seq_len=seq)
    c.optim.update(lr=lr, warmup_steps=0, weight_decay=0.1, clip_norm=1.0, b1=0.9, b2=0.95)
    return c


def torch_model(model_cfg, params: dict):
    """GPT2LMHeadModel of jaxlm's model config holding jaxlm's parameters `params` (numpy), through
    the same converter as `jaxlm-convert export`."""
    hf = gpt2.config_to_hf(model_cfg, "GPT2LMHeadModel", {})
    model = GPT2LMHeadModel(GPT2Config(**hf))
    state = gpt2.params_to_hf(jax.device_get(params), model_cfg, "GPT2LMHeadModel")
    tensors = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # The LM head is the tied embedding; the attention bias buffers are not parameters.
    left = [k for k in missing if k != "lm_head.weight" and not k.endswith("attn.bias")]
    if left or unexpected:
        raise RuntimeError(f"weight copy: missing {left}, unexpected {unexpected}")
    model.tie_weights()
    return model


def _ms_per_step(run_chunk, per_chunk: int) -> float:
    t0 = time.perf_counter()
    run_chunk()
    return 1e3 * (time.perf_counter() - t0) / per_chunk


def compare_train(cfg, s, state, tmodel, rounds: int, per_chunk: int) -> dict:
    """Alternate chunks of jaxlm and torch train steps on one batch; median ms per step each."""
    step_fn = train.make_train_step(s)
    host = s.data.train_batch(0)
    batch = jax.device_put(host, s.batch_sharding)
    inputs = torch.from_numpy(np.asarray(host["inputs"], np.int64))
    targets = torch.from_numpy(np.asarray(host["targets"], np.int64))
    o = cfg.optim
    opt = torch.optim.AdamW(
        tmodel.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay
    )
    tmodel.train()

    def torch_step():
        opt.zero_grad(set_to_none=True)
        logits = tmodel(inputs).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tmodel.parameters(), o.clip_norm)
        opt.step()
        return loss

    box = {"state": state}

    def jax_chunk():
        st, metrics = box["state"], None
        for _ in range(per_chunk):
            st, metrics = step_fn(st, batch)
        jax.block_until_ready(metrics)
        box["state"], box["metrics"] = st, metrics

    def torch_chunk():
        for _ in range(per_chunk):
            box["torch_loss"] = torch_step()
        box["torch_loss"].item()

    with sharding.use_rules(s.mesh, cfg.mesh.rules):
        box["state"], metrics = step_fn(box["state"], batch)  # compile
        jax_loss = float(metrics["loss"])
        torch_loss = float(torch_step().detach())
        jax_chunk(), torch_chunk()  # warm-up
        jax_ms, torch_ms = [], []
        for _ in range(rounds):
            jax_ms.append(_ms_per_step(jax_chunk, per_chunk))
            torch_ms.append(_ms_per_step(torch_chunk, per_chunk))
    ratios = [t / j for j, t in zip(jax_ms, torch_ms, strict=True)]
    jm, tm = statistics.median(jax_ms), statistics.median(torch_ms)
    return {
        "jaxlm_step_ms": round(jm, 2),
        "torch_step_ms": round(tm, 2),
        "train_speedup": round(tm / jm, 3),
        "train_speedup_range": [round(min(ratios), 3), round(max(ratios), 3)],
        "loss_first": {"jaxlm": round(jax_loss, 5), "torch": round(torch_loss, 5)},
    }


def step_gemms(size: str, library: str) -> list[tuple[str, tuple, tuple, int, int, int]]:
    """The dense matrix products of one step of `size` as `library` ("jaxlm" or "torch") forms
    them: jaxlm projects queries, keys and values with three [D, D] weights, GPT2LMHeadModel
    with one [D, 3D]. Per weight the forward product, the input gradient and the weight gradient,
    as autograd forms them. Attention's own score and value products are left out: torch runs
    those inside its fused SDPA kernel. Each entry is
    (name, lhs shape, rhs shape, lhs contracting dim, rhs contracting dim, how many a step)."""
    layers, d, _, ff, vocab, batch, seq = SIZES[size]
    m = batch * seq
    qkv = (("q", d, d), ("k", d, d), ("v", d, d)) if library == "jaxlm" else (("qkv", d, 3 * d),)
    gemms = []
    for name, n_in, n_out in (*qkv, ("proj", d, d), ("up", d, ff), ("down", ff, d)):
        gemms.append((f"{name} forward", (m, n_in), (n_in, n_out), 1, 0, layers))  # x @ W
        gemms.append((f"{name} input grad", (m, n_out), (n_in, n_out), 1, 1, layers))  # g @ W^T
        gemms.append((f"{name} weight grad", (m, n_in), (m, n_out), 0, 0, layers))  # x^T @ g
    # The tied head: logits = x @ E^T with E [V, D]; gradients g @ E and g^T @ x.
    gemms.append(("head forward", (m, d), (vocab, d), 1, 1, 1))
    gemms.append(("head input grad", (m, vocab), (vocab, d), 1, 0, 1))
    gemms.append(("head weight grad", (m, vocab), (m, d), 0, 0, 1))
    return gemms


def gemm_flops(gemms) -> int:
    total = 0
    for _, lhs, rhs, lc, rc, count in gemms:
        total += 2 * lhs[1 - lc] * lhs[lc] * rhs[1 - rc] * count
    return total


def _gemm_run(lhs, rhs, lc: int, rc: int, reps: int, rng, runner: str):
    """One product `reps` times over, as a zero-argument run by `runner` ("xla" or "torch").

    XLA's is one jitted loop whose every product feeds the next (its max nudges one input
    element by 1e-30 of it), so nothing is hoisted and the threads stay busy as they do inside
    a train step: a call per product would time the thread pool's wake-ups instead (1.5x the
    loops' time over the `issue` step's products). The max reads each product once more, a few
    percent on the largest outputs. torch's is `torch.mm` on transposed views, as autograd
    calls it."""
    a = rng.standard_normal(lhs, dtype=np.float32)
    b = rng.standard_normal(rhs, dtype=np.float32)
    if runner == "torch":
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        ta, tb = (ta if lc == 1 else ta.t()), (tb if rc == 0 else tb.t())

        def torch_run():
            for _ in range(reps):
                torch.mm(ta, tb)

        return torch_run
    dims = (((lc,), (rc,)), ((), ()))

    def loop(a, b):
        def body(_, a):
            y = jax.lax.dot_general(a, b, dims)
            return a.at[0, 0].add(1e-30 * jax.numpy.max(y))

        return jax.lax.fori_loop(0, reps, body, a)

    jloop, ja, jb = jax.jit(loop), jax.numpy.asarray(a), jax.numpy.asarray(b)
    return lambda: jax.block_until_ready(jloop(ja, jb))


# compare_gemms' product lists: (whose products, run by) each.
_GEMM_RUNS = {
    "jaxlm": ("jaxlm", "xla"),
    "xla_gpt2_layout": ("torch", "xla"),  # GPT-2's fused [D, 3D] QKV product, by XLA
    "torch": ("torch", "torch"),
}


def compare_gemms(size: str, rounds: int, reps: int = 5) -> dict:
    """A train step's dense matrix products alone (`step_gemms`), in turns: jaxlm's run by XLA,
    GPT2LMHeadModel's by torch, and GPT2LMHeadModel's by XLA (which separates XLA's products
    from jaxlm's choice of them); ms a step of each. Set against the step times, this splits
    each step into matrix products and the rest (attention, norms, activations, loss,
    optimizer and, in torch, Python's dispatch)."""
    rng = np.random.default_rng(0)
    runs = {}
    for name, (layout, runner) in _GEMM_RUNS.items():
        counts = collections.Counter()  # products of the same shapes are timed once
        for _, lhs, rhs, lc, rc, count in step_gemms(size, layout):
            counts[lhs, rhs, lc, rc] += count
        runs[name] = []
        for (lhs, rhs, lc, rc), count in counts.items():
            run = _gemm_run(lhs, rhs, lc, rc, reps, rng, runner)
            run()  # compile, warm
            runs[name].append((run, count))
    ms = {name: [] for name in runs}
    for _ in range(rounds):
        for name, products in runs.items():
            ms[name].append(sum(count * _ms_per_step(run, reps) for run, count in products))
    med = {name: statistics.median(times) for name, times in ms.items()}
    flops = gemm_flops(step_gemms(size, "jaxlm"))
    assert flops == gemm_flops(step_gemms(size, "torch"))
    return {
        "gemm_flops": flops,
        "jaxlm_gemm_ms": round(med["jaxlm"], 3),
        "xla_gpt2_layout_gemm_ms": round(med["xla_gpt2_layout"], 3),
        "torch_gemm_ms": round(med["torch"], 3),
        "gemm_speedup": round(med["torch"] / med["jaxlm"], 3),
    }


def memory_bandwidth(mbytes: int, reps: int = 5) -> float:
    """Bytes/s that a jitted matrix-vector product streams from memory (best of `reps`): the
    most that decoding, which reads every weight once per step, can draw."""
    cols = 1024
    w = jax.numpy.ones(((mbytes << 20) // (4 * cols), cols), "float32")
    v = jax.numpy.ones((cols,), "float32")
    matvec = jax.jit(jax.numpy.dot)
    jax.block_until_ready(matvec(w, v))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(matvec(w, v))
        best = min(best, time.perf_counter() - t0)
    return w.nbytes / best


def _decode_weight_bytes(model_cfg) -> int:
    """fp32 bytes a decode step reads whatever the batch: every weight once (the tied embedding
    once, as the head) but one row of the position table; the KV cache and activations come on
    top, so batch x bandwidth / these bytes bounds tokens/s from above."""
    return 4 * model_cfg.num_params(embeddings=False)


def compare_decode(
    cfg, s, params, tmodel, batch: int, prompt_len: int, new_tokens: int, rounds, steps_bound
):
    """Greedy generation of `new_tokens` after random prompts: tokens/s of each, same tokens?
    And the memory-bound ceiling of any decode loop: `steps_bound` decode steps a second (the
    bandwidth over the bytes a step reads), each emitting a token per row."""
    gen = make_generate(s.graphdef, SamplingSettings(max_new_tokens=new_tokens, temperature=0.0))
    rng = np.random.default_rng(batch)
    prompts = rng.integers(0, cfg.model.vocab_size, (batch, prompt_len), dtype=np.int32)
    lengths = jax.numpy.full((batch,), prompt_len, "int32")
    key = jax.random.key(0)
    tprompts = torch.from_numpy(prompts.astype(np.int64))
    tmodel.eval()

    def jax_run():
        return jax.block_until_ready(gen(params, prompts, lengths, key))[0]

    def torch_run():
        with torch.inference_mode():
            out = tmodel.generate(
                tprompts,
                attention_mask=torch.ones_like(tprompts),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        return out[:, prompt_len:]

    with sharding.use_rules(s.mesh, cfg.mesh.rules):
        jax_tokens, torch_tokens = np.asarray(jax_run()), torch_run().numpy()  # compile, warm
        jax_s, torch_s = [], []
        for _ in range(rounds):
            for run, times in ((jax_run, jax_s), (torch_run, torch_s)):
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
    same = jax_tokens.shape == torch_tokens.shape and bool((jax_tokens == torch_tokens).all())
    jt = batch * new_tokens / statistics.median(jax_s)
    tt = batch * new_tokens / statistics.median(torch_s)
    ceiling = batch * steps_bound
    return {
        "batch": batch,
        "jaxlm_tokens_per_sec": round(jt, 1),
        "torch_tokens_per_sec": round(tt, 1),
        "decode_speedup": round(jt / tt, 3),
        "memory_bound_tokens_per_sec": round(ceiling, 1),
        "memory_bound_speedup": round(ceiling / tt, 3),
        "greedy_identical": same,
        "matching_tokens": float(np.mean(jax_tokens == torch_tokens)) if not same else 1.0,
    }


def run_size(size: str, args) -> dict:
    cfg = jaxlm_config(size, args.prompt_len + args.new_tokens)
    s = train.setup(cfg, None, data=benchmark.synthetic_source(cfg))
    state = train.create_state(s)
    params = jax.device_get(state["params"])  # before any step: both models start here
    tmodel = torch_model(s.model_cfg, params)
    layers, d, heads, ff, vocab, batch, seq = SIZES[size]
    row = {
        "size": size,
        "shape": dict(layers=layers, d_model=d, heads=heads, d_ff=ff, vocab=vocab),
        "batch": [batch, seq],
        "params": s.model_cfg.num_params(),
    }
    _progress(f"{size}: train steps")
    row.update(compare_train(cfg, s, state, tmodel, args.rounds, args.steps))
    _progress(f"{size}: the step's matrix products alone")
    split = compare_gemms(size, args.rounds)
    for lib in ("jaxlm", "torch"):  # each step's time outside its matrix products
        split[f"{lib}_rest_ms"] = round(row[f"{lib}_step_ms"] - split[f"{lib}_gemm_ms"], 3)
    row["gemms"] = split
    _progress(f"{size}: {row['jaxlm_step_ms']} ms vs {row['torch_step_ms']} ms; decoding")
    if args.decode_batches:
        # Fresh copies of the initial weights (the train steps above changed both models).
        tmodel = torch_model(s.model_cfg, params)
        jparams = jax.device_put(params, s.model.shardings)
        bandwidth = memory_bandwidth(args.bandwidth_mb)
        row["memory_gb_per_s"] = round(bandwidth / 1e9, 3)
        row["decode_weight_bytes"] = _decode_weight_bytes(s.model_cfg)
        steps_bound = bandwidth / row["decode_weight_bytes"]
        row["decode"] = [
            compare_decode(
                cfg, s, jparams, tmodel, int(b), args.prompt_len, args.new_tokens, args.rounds,
                steps_bound,
            )
            for b in args.decode_batches.split(",")
        ]  # fmt: skip
    row.update(
        {
            "threads": {
                "torch": torch.get_num_threads(),
                "xla_cores": len(os.sched_getaffinity(0)),
            },
            "torch_attention": tmodel.config._attn_implementation,
            "versions": {
                "jax": jax.__version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
        }
    )
    return row


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="pylm_tiny,issue,gpt2_small", help=", ".join(SIZES))
    p.add_argument("--rounds", type=int, default=5, help="alternations (median over them)")
    p.add_argument("--steps", type=int, default=5, help="train steps per chunk")
    p.add_argument("--decode_batches", default="1,32", help="empty: no decoding")
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument(
        "--bandwidth_mb", type=int, default=512, help="fp32 MiB the bandwidth probe streams"
    )
    p.add_argument("--cores", type=int, default=0, help="pin to this many cores; 0: all allowed")
    args = p.parse_args(argv)
    if args.cores:
        # Before XLA's CPU client exists: it sizes its thread pool to the cores it may use.
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])
    unknown = [x for x in args.sizes.split(",") if x not in SIZES]
    if unknown:
        p.error(f"unknown size {unknown[0]!r}; use one of {', '.join(SIZES)}")
    torch.set_num_threads(_cores())  # torch's pool: the same cores
    for size in args.sizes.split(","):
        print(json.dumps(run_size(size, args)), flush=True)


if __name__ == "__main__":
    main()
