"""One training step of apt_jax's MMDiT vs diffusers' SD3Transformer2DModel on this CPU.

Same architecture (4 joint blocks, 6 heads x 64 = width 384, patch 2, 16
latent channels, 32x32 latents = 256 image tokens, 32 text tokens), same
weights (copied with `apt_jax.convert.diffusers_sd3.from_diffusers_state_dict`),
same batch (8), fp32, the same loss (MSE of the velocity to a random target)
and AdamW (lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight decay 0.01). The JAX
step is `jax.jit`ted with params and optimizer state donated; PyTorch runs
eager with `torch.optim.AdamW`. Runs are interleaved (jax, torch, jax, ...)
after warm-up so that load from other processes hits both alike; the table
reports medians.

    python benchmarks/torch_vs_jax_step.py
    python benchmarks/torch_vs_jax_step.py --xla_flags=--xla_cpu_use_thunk_runtime=false
    python benchmarks/torch_vs_jax_step.py --attention einsum   # experiment, see --help
    python benchmarks/torch_vs_jax_step.py --gemms  # + the step's GEMMs timed alone

`--gemms` adds a second table: every `dot_general` in the JAX step's jaxpr
(forward and backward), grouped by shape, each timed alone as a jitted
`lax.dot_general` and as the same `torch.einsum`. Their sum is a floor for
the JAX step on this machine that no fusion of the other ops can lower.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--pairs", type=int, default=15)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--num_layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--latent_size", type=int, default=32)
    p.add_argument("--context_len", type=int, default=32)
    p.add_argument("--text_dim", type=int, default=256, help="joint and pooled text widths")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: cores)")
    p.add_argument("--xla_flags", default="", help="appended to XLA_FLAGS before JAX starts")
    p.add_argument("--remat", default="none", help="MMDiTConfig.remat_policy of the JAX model")
    p.add_argument("--jax_dtype", default="float32", help="MMDiTConfig.dtype (compute)")
    p.add_argument(
        "--attention",
        default="model",
        choices=["model", "einsum", "einsum_hmajor"],
        help="experiment: swap apt_jax's jax.nn.dot_product_attention call for a plain "
        "einsum/softmax, tokens- or heads-major (patched in this process only)",
    )
    p.add_argument("--torch_fused", action="store_true", help="torch AdamW(fused=True)")
    p.add_argument("--torch_compile", action="store_true", help="torch.compile the model")
    p.add_argument(
        "--gemms", action="store_true", help="also time the step's GEMMs alone (see above)"
    )
    return p.parse_args()


ARGS = parse_args()
if ARGS.xla_flags:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + ARGS.xla_flags).strip()

import jax  # noqa: E402
import jax.extend  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
from diffusers import SD3Transformer2DModel  # noqa: E402

from apt_jax.convert.diffusers_sd3 import from_diffusers_state_dict  # noqa: E402
from apt_jax.models import MMDiT, MMDiTConfig  # noqa: E402
from benchmarks.apt_r1 import median_time  # noqa: E402

LR, BETAS, EPS, WD = 1e-4, (0.9, 0.999), 1e-8, 0.01


def einsum_attention(q, k, v, implementation):
    """`(B, T, H, K)` attention as two einsums and a softmax (experiment)."""
    del implementation
    scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def einsum_hmajor_attention(q, k, v, implementation):
    """As `einsum_attention` with heads moved before tokens first (experiment)."""
    del implementation
    q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # (B, H, T, K)
    scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    logits = jnp.einsum("bhqd,bhkd->bhqk", q * scale, k)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", probs, v).transpose(0, 2, 1, 3)


ATTENTION = {"einsum": einsum_attention, "einsum_hmajor": einsum_hmajor_attention}


def step_gemms(fn, *example_args) -> list[tuple]:
    """Every `dot_general` in `fn`'s jaxpr, sub-jaxprs included (jit, custom_vjp, ...).

    Returns one `(lhs_shape, rhs_shape, dimension_numbers)` per call.
    """
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                lhs, rhs = eqn.invars
                found.append((lhs.aval.shape, rhs.aval.shape, eqn.params["dimension_numbers"]))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*example_args).jaxpr)
    return found


def gemm_einsum(lhs_shape, rhs_shape, dimension_numbers) -> tuple[str, int]:
    """The einsum equation of a `dot_general` (output in dot_general's order) and its FLOPs."""
    (lc, rc), (lb, rb) = dimension_numbers
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    lhs = [next(letters) for _ in lhs_shape]
    rhs = [next(letters) for _ in rhs_shape]
    for i, j in zip(lc + lb, rc + rb, strict=True):
        rhs[j] = lhs[i]
    free_l = [lhs[i] for i in range(len(lhs)) if i not in lc + lb]
    free_r = [rhs[j] for j in range(len(rhs)) if j not in rc + rb]
    out = [lhs[i] for i in lb] + free_l + free_r
    sizes = dict(zip(lhs + rhs, lhs_shape + rhs_shape, strict=True))
    flops = 2 * int(np.prod([sizes[c] for c in out])) * int(np.prod([lhs_shape[i] for i in lc]))
    return f"{''.join(lhs)},{''.join(rhs)}->{''.join(out)}", flops


def print_gemm_floor(gemms: list[tuple], jax_step_s: float, torch_step_s: float, repeats: int):
    """Times each distinct GEMM of the step alone in both frameworks; prints the table."""
    counts = collections.Counter((tuple(lhs), tuple(rhs), dn) for lhs, rhs, dn in gemms)
    rng = np.random.default_rng(0)
    rows = []  # (calls, einsum, lhs shape, rhs shape, FLOPs, jax s, torch s) per GEMM
    for (ls, rs, dn), n in counts.items():
        eq, flops = gemm_einsum(ls, rs, dn)
        a = rng.normal(size=ls).astype(np.float32)
        b = rng.normal(size=rs).astype(np.float32)
        jdot = jax.jit(functools.partial(jax.lax.dot_general, dimension_numbers=dn))
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        js = median_time(jdot, jnp.asarray(a), jnp.asarray(b), repeats=repeats)
        ts = median_time(torch.einsum, eq, ta, tb, repeats=repeats)
        rows.append((n, eq, ls, rs, flops, js, ts))
    rows.sort(key=lambda r: r[0] * r[5], reverse=True)  # by total JAX time
    jax_total = sum(n * js for n, *_, js, _ in rows)
    torch_total = sum(n * ts for n, *_, ts in rows)
    flops_total = sum(n * flops for n, _, _, _, flops, _, _ in rows)
    print()
    print(
        f"The step's {len(gemms)} GEMMs ({flops_total / 1e9:.1f} GFLOP, {len(counts)} distinct), "
        f"each timed alone (median of {repeats}), largest total first:"
    )
    print()
    print("| einsum | lhs | rhs | calls | jax ms | torch ms | jax GFLOP/s | torch GFLOP/s |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for n, eq, ls, rs, flops, js, ts in rows:
        print(
            f"| {eq} | {ls} | {rs} | {n} | {js * 1e3:.2f} | {ts * 1e3:.2f} "
            f"| {flops / js / 1e9:.0f} | {flops / ts / 1e9:.0f} |"
        )
    print(
        f"| **all** | | | {len(gemms)} | {jax_total * 1e3:.0f} | {torch_total * 1e3:.0f} "
        f"| {flops_total / jax_total / 1e9:.0f} | {flops_total / torch_total / 1e9:.0f} |"
    )
    print()
    print(
        f"JAX's GEMMs alone: {jax_total:.3f} s = {jax_total / jax_step_s:.0%} of its step, "
        f"{jax_total / torch_step_s:.2f}x PyTorch's whole step ({torch_step_s:.3f} s). "
        f"PyTorch's GEMMs alone: {torch_total:.3f} s = "
        f"{torch_total / torch_step_s:.0%} of its step."
    )


def architecture(args) -> dict:
    width = args.heads * 64
    return dict(
        sample_size=args.latent_size,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=args.num_layers,
        attention_head_dim=64,
        num_attention_heads=args.heads,
        joint_attention_dim=args.text_dim,
        caption_projection_dim=width,
        pooled_projection_dim=args.text_dim,
        pos_embed_max_size=args.latent_size // 2,
    )


def main(args):
    if args.attention != "model":
        from apt_jax.models import layers

        layers.dot_product_attention = ATTENTION[args.attention]
    cores = len(os.sched_getaffinity(0))
    threads = args.threads or cores
    torch.set_num_threads(threads)
    arch = architecture(args)

    # ---- one set of weights, in both frameworks.
    torch.manual_seed(0)
    tmodel = SD3Transformer2DModel(**arch).train()
    with torch.no_grad():
        for p in tmodel.parameters():  # diffusers zero-inits adaLN and proj_out
            p.normal_(0.0, 0.02)
    state_dict = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
    config = MMDiTConfig(**arch, remat_policy=args.remat, dtype=args.jax_dtype)
    params = jax.tree.map(jnp.asarray, from_diffusers_state_dict(config, state_dict))

    # ---- one batch, in both layouts.
    rng = np.random.default_rng(0)
    b, s = args.batch, args.latent_size
    x = rng.normal(size=(b, s, s, 16)).astype(np.float32)  # NHWC
    target = rng.normal(size=(b, s, s, 16)).astype(np.float32)
    t = rng.uniform(0.05, 0.95, size=(b,)).astype(np.float32)
    ctx = rng.normal(size=(b, args.context_len, args.text_dim)).astype(np.float32)
    pooled = rng.normal(size=(b, args.text_dim)).astype(np.float32)
    jbatch = tuple(jnp.asarray(a) for a in (x, t, ctx, pooled, target))
    tbatch = (
        torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
        torch.from_numpy(1000.0 * t),
        torch.from_numpy(ctx),
        torch.from_numpy(pooled),
        torch.from_numpy(target.transpose(0, 3, 1, 2).copy()),
    )

    # ---- JAX step.
    model = MMDiT(config)
    tx = optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WD)

    def loss_fn(p, batch):
        xb, tb, cb, pb, yb = batch
        v = model.apply({"params": p}, xb, tb, cb, pb)
        return jnp.mean(jnp.square(v - yb))

    @jax.jit
    def _step(p, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(p, batch)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    jax_step = jax.jit(_step, donate_argnums=(0, 1))
    jstate = [params, tx.init(params)]

    def run_jax():
        jstate[0], jstate[1], loss = jax_step(jstate[0], jstate[1], jbatch)
        return float(loss)  # waits for the step

    # ---- PyTorch step.
    opt = torch.optim.AdamW(
        tmodel.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, fused=args.torch_fused
    )
    forward = torch.compile(tmodel) if args.torch_compile else tmodel

    def run_torch():
        xb, tb, cb, pb, yb = tbatch
        opt.zero_grad(set_to_none=True)
        out = forward(
            hidden_states=xb, timestep=tb, encoder_hidden_states=cb, pooled_projections=pb
        ).sample
        loss = torch.nn.functional.mse_loss(out, yb)
        loss.backward()
        opt.step()
        return loss.detach().item()

    # ---- sanity: the same model gives the same losses (steps 1-2 also check AdamW).
    t0 = time.perf_counter()
    jl = [run_jax()]
    compile_s = time.perf_counter() - t0
    tl = [run_torch()]
    for _ in range(max(args.warmup - 1, 1)):
        jl.append(run_jax())
        tl.append(run_torch())
    rel = abs(jl[0] - tl[0]) / abs(tl[0])
    print(f"first-step loss: jax {jl[0]:.6f}  torch {tl[0]:.6f}  rel diff {rel:.1e}")
    print("warm-up losses jax  :", " ".join(f"{v:.6f}" for v in jl))
    print("warm-up losses torch:", " ".join(f"{v:.6f}" for v in tl))
    if rel > 1e-3:
        print("WARNING: first-step losses disagree; the models differ.")

    # ---- timing, interleaved.
    jt, tt, jc, tc = [], [], [], []
    for _ in range(args.pairs):
        for run, wall, cpu in ((run_jax, jt, jc), (run_torch, tt, tc)):
            c0, t0 = time.process_time(), time.perf_counter()
            run()
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    jm, tm = float(np.median(jt)), float(np.median(tt))
    jcm, tcm = float(np.median(jc)), float(np.median(tc))

    width = args.heads * 64
    print()
    print(
        f"Train step (fwd + bwd + AdamW), {args.num_layers} layers, width {width} "
        f"({args.heads} heads x 64), {(s // 2) ** 2} image + {args.context_len} text tokens, "
        f"batch {b}, fp32 params, {cores} CPU cores (load average "
        f"{os.getloadavg()[0]:.1f} at start), torch threads "
        f"{torch.get_num_threads()}, jax {jax.__version__} ({args.jax_dtype} compute, "
        f"remat {args.remat}, attention {args.attention}), torch {torch.__version__}"
        f"{' fused AdamW' if args.torch_fused else ''}"
        f"{' compiled' if args.torch_compile else ''}; XLA_FLAGS="
        f"'{os.environ.get('XLA_FLAGS', '')}'; {args.pairs} interleaved pairs after "
        f"{args.warmup} warm-up steps each (JAX compile {compile_s:.1f} s):"
    )
    print()
    print(
        "| framework | median s/step | min | max | jax / torch | median CPU s/step "
        "| jax / torch (CPU) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(
        f"| apt_jax (jit) | {jm:.3f} | {min(jt):.3f} | {max(jt):.3f} | {jm / tm:.2f} "
        f"| {jcm:.3f} | {jcm / tcm:.2f} |"
    )
    print(
        f"| PyTorch (eager) | {tm:.3f} | {min(tt):.3f} | {max(tt):.3f} | 1.00 | {tcm:.3f} | 1.00 |"
    )
    print()
    print(
        "CPU s = process CPU time (all threads) per step: less sensitive than wall time to "
        "other processes on a shared machine, but it counts spin-waiting threads too."
    )
    if args.gemms:
        gemms = step_gemms(jax.value_and_grad(loss_fn), jstate[0], jbatch)
        print_gemm_floor(gemms, jm, tm, repeats=max(args.pairs, 10))


if __name__ == "__main__":
    main(ARGS)
