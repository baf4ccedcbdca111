"""LoRA (apt_jax.lora): the pytree transformation, and the recipes training adapters.

Recipes start from the shared tiny SFT run (`teacher_dir`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apt_jax.lora import LoRA, LoRASettings, dense_modules, matches
from apt_jax.models import get_variant, init_params
from apt_jax.tasks import build_task
from apt_jax.tasks.networks import make_generator
from apt_jax.tasks.runs import load_run
from apt_jax.train import sharding
from apt_jax.train.loop import train
from apt_jax.train.lora_state import LoRATrainState, model_params
from configs import digits_apt, digits_distill, digits_sft

ATTN = "to_q,to_k,to_v,to_out,add_q_proj,add_k_proj,add_v_proj,to_add_out"


def leaves_equal(a, b) -> bool:
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def randomise_b(adapters, seed=1, scale=0.1):
    """Adapters with B drawn at random (a trained adapter, not the zero start)."""
    keys = iter(jax.random.split(jax.random.key(seed), 1000))

    def fill(path, x):
        if path[-1].key == "lora_B":
            return scale * jax.random.normal(next(keys), x.shape, x.dtype)
        return x

    return jax.tree_util.tree_map_with_path(fill, adapters)


# --------------------------------------------------------------------------- the transformation
@pytest.fixture(scope="module", params=[False, True], ids=["unrolled", "scanned"])
def mmdit(request):
    config = get_variant("test", num_layers=3, scan_layers=request.param)
    return config, jax.jit(lambda r: init_params(config, r))(jax.random.key(0))


def test_zero_b_equals_base_exactly(mmdit):
    from apt_jax.models import MMDiT, dummy_inputs

    config, params = mmdit
    lora = LoRA.for_params(LoRASettings(4, 8.0, ("*",)), params)
    assert len(lora.targets) == len(dense_modules(params)) > 10
    adapters = lora.init(params)
    merged = lora.merge(params, adapters)
    assert leaves_equal(merged, params)
    x, t, ctx, pooled = dummy_inputs(config, batch=2)
    x = jax.random.normal(jax.random.key(1), x.shape)
    apply = jax.jit(lambda p: MMDiT(config).apply({"params": p}, x, t + 0.5, ctx, pooled))
    base, adapted = apply(params), apply(merged)
    np.testing.assert_array_equal(np.asarray(adapted), np.asarray(base))


def test_merged_kernel_is_base_plus_scaled_low_rank(mmdit):
    config, params = mmdit
    lora = LoRA.for_params(LoRASettings(3, 6.0, ("attn/to_*", "ff/fc_in")), params)
    adapters = randomise_b(lora.init(params))
    merged = lora.merge(params, adapters)
    x = np.random.default_rng(0).normal(size=(5, config.inner_dim)).astype(np.float32)
    stacked = 0
    for path, shape in lora.targets:
        node_p, node_m, node_a = params, merged, adapters
        for name in path:
            node_p, node_m, node_a = node_p[name], node_m[name], node_a[name]
        w = np.asarray(node_p["kernel"], np.float64)
        a, b = np.asarray(node_a["lora_A"], np.float64), np.asarray(node_a["lora_B"], np.float64)
        assert a.shape == (*shape[:-1], 3) and b.shape == (*shape[:-2], 3, shape[-1])
        if len(shape) == 3:
            stacked += 1
        xin = x[:, : shape[-2]]
        # The adapted layer: base output plus the scaled low-rank branch (2.0 = alpha / r).
        branch = np.einsum("ni,...ir,...ro->...no", xin, a, b)
        want = np.einsum("ni,...io->...no", xin, w) + 2.0 * branch
        got = np.einsum("ni,...io->...no", xin, np.asarray(node_m["kernel"], np.float64))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert (stacked > 0) == config.scan_layers
    # Untargeted leaves are the base's, unchanged.
    assert merged["proj_out"]["kernel"] is params["proj_out"]["kernel"]


def test_patterns():
    path = "mmdit/transformer_blocks_0/attn/to_q"
    assert matches("to_q", path) and matches("attn/to_*", path) and matches("re:.*/to_q", path)
    assert not matches("to_k", path) and not matches("re:to_q", path)
    assert not matches("q", path)  # a tail starts at a component boundary
    assert matches("mmdit/transformer_blocks_0/*", path)
    assert LoRASettings(2, 2.0, " to_q, to_k ,").target_modules == ("to_q", "to_k")


def test_pattern_matching_nothing_lists_the_modules(mmdit):
    _, params = mmdit
    with pytest.raises(ValueError, match="'attn.to_k' matches no dense module") as e:
        LoRA.for_params(LoRASettings(4, 4.0, ("to_q", "attn.to_k")), params)
    msg = str(e.value)
    assert "'attn.to_k' matches no dense module" in msg
    assert "attn/to_k" in msg and "context_embedder" in msg and "ff/fc_in" in msg


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank=0), "rank=0 must be a positive int"),
        (dict(alpha=0.0), "alpha=0.0 must be > 0"),
        (dict(target_modules=""), "target_modules is empty"),
        (dict(target_modules="re:(to_q"), "not a valid regex"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRASettings(**{"rank": 4, "alpha": 4.0, "target_modules": "to_q", **kwargs})


# --------------------------------------------------------------------------- SFT with adapters
def sft_config(teacher_dir, **overrides):
    c = digits_sft.get_config("tiny")
    c.eval.num_samples = 20
    c.eval.grid_rows = 2
    c.init_workdir = teacher_dir
    c.update_from_flattened_dict({"lora.rank": 4, "lora.alpha": 8.0, **overrides})
    return c


def run(task, batches, rng=jax.random.key(7)):
    state = task.init_state(jax.random.key(0))
    for b in batches:
        state, metrics = task.train_step(state, sharding.make_global_batch(b, task.mesh), rng)
    return state, metrics


@pytest.fixture(scope="module")
def sft_tasks(teacher_dir):
    c = sft_config(teacher_dir)
    one = build_task(c, sharding.make_mesh({"data": 1}, jax.devices()[:1]))
    many = build_task(c, sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1}))
    batches = [b for _, b in zip(range(2), one.make_iterator(), strict=False)]
    return one, many, batches


def test_sft_step_changes_only_the_adapters(sft_tasks, teacher_dir):
    one, _, batches = sft_tasks
    start = one.init_state(jax.random.key(0))
    assert isinstance(start, LoRATrainState)
    # The base is the init run's served weights; the adapted model starts equal to it.
    t_task, t_state, _ = load_run(teacher_dir)
    assert leaves_equal(start.base, t_task.served_params(t_state))
    assert leaves_equal(one.served_params(start), start.base)
    # Only the adapters carry optimizer state.
    n_opt = sum(x.size for x in jax.tree.leaves(start.opt_state))
    n_adapters = sum(x.size for x in jax.tree.leaves(start.params))
    n_base = sum(x.size for x in jax.tree.leaves(start.base))
    assert n_opt <= 2 * n_adapters + 2 and n_adapters < n_base / 5
    start_copy = jax.tree.map(np.asarray, start)
    end, metrics = run(one, batches)
    assert np.isfinite(float(metrics["loss"]))
    assert leaves_equal(end.base, start_copy.base)  # frozen, bit for bit
    moved = {
        name: float(np.abs(np.asarray(end.params[p0][p1][p2][p3]["lora_B"])).max())
        for name, (p0, p1, p2, p3) in zip(
            start.lora.module_names, (p for p, _ in start.lora.targets), strict=True
        )
    }
    # Every B moved except the last block's context query: that block drops its
    # context output (context_pre_only), so the query gets exactly zero gradient.
    unused = "mmdit/transformer_blocks_1/attn/add_q_proj"
    assert moved.pop(unused) == 0.0
    assert len(moved) == 14 and min(moved.values()) > 0
    # The model the sampler serves moved with the adapters.
    served = one.served_params(end)
    assert not leaves_equal(served, start_copy.base)


def test_sft_lora_sharded_step_equals_single_device(sft_tasks):
    one, many, batches = sft_tasks
    s1, _ = run(one, batches)
    s8, _ = run(many, batches)
    for x, y in zip(jax.tree.leaves(s1), jax.tree.leaves(s8), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
    # fsdp splits the adapters like their kernels: A's input (embed) axis, 8 ways.
    a = s8.params["mmdit"]["transformer_blocks_0"]["attn"]["to_q"]["lora_A"]
    w = s8.base["mmdit"]["transformer_blocks_0"]["attn"]["to_q"]["kernel"]
    assert a.addressable_shards[0].data.shape == (a.shape[0] // 8, a.shape[1])
    assert w.addressable_shards[0].data.shape[0] == w.shape[0] // 8


def test_sft_lora_run_saves_and_reloads(sft_tasks, tmp_path):
    task = sft_tasks[1]
    task.config.total_steps = task.config.checkpoint_every = 2
    task.config.optimizer.warmup_steps = 1
    results = train(task, str(tmp_path))
    assert results["step"] == 2 and np.isfinite(results["eval/frechet_distance"])
    task, state, step = load_run(str(tmp_path))
    assert step == 2 and isinstance(state, LoRATrainState)
    assert int(state.step) == 2
    served = task.served_params(state)
    assert jax.tree.structure(served) == jax.tree.structure(state.base)


def test_lora_without_a_base_fails_before_compiling(monkeypatch):
    c = digits_sft.get_config("tiny")
    c.lora.rank = 4
    monkeypatch.setattr(jax, "jit", lambda *a, **k: pytest.fail("compiled first"))
    with pytest.raises(ValueError, match=r"neither config.init_workdir .* nor config.init_from"):
        build_task(c)


def test_two_starting_points_fail_before_compiling(monkeypatch):
    c = digits_sft.get_config("tiny")
    c.init_workdir, c.init_from = "runs/sft", "ckpt/sd3"
    monkeypatch.setattr(jax, "jit", lambda *a, **k: pytest.fail("compiled first"))
    with pytest.raises(ValueError, match="both name the starting weights; set one"):
        build_task(c)


def test_unmatched_target_fails_before_compiling(teacher_dir, monkeypatch):
    c = sft_config(teacher_dir, **{"lora.target_modules": "to_q,attention.query"})
    monkeypatch.setattr(jax, "jit", lambda *a, **k: pytest.fail("compiled first"))
    with pytest.raises(ValueError, match=r"'attention.query' matches no dense module.*to_q"):
        build_task(c)


# --------------------------------------------------------------------------- distillation, APT
def test_distill_lora_student_is_teacher_plus_adapters(teacher_dir):
    c = digits_distill.get_config("deterministic,tiny")
    c.teacher_workdir = teacher_dir
    c.update_from_flattened_dict({"lora.rank": 4, "lora.alpha": 4.0})
    task = build_task(c, sharding.make_mesh({"data": 1}, jax.devices()[:1]))
    it = task.make_iterator()
    state = task.init_state(jax.random.key(0))
    # The student's only weights are its adapters; its base is the teacher (held once).
    assert set(state) == {"student", "teacher"}
    assert {x.ndim for x in jax.tree.leaves(state["student"].params)} == {2}
    teacher = jax.tree.map(np.asarray, state["teacher"])
    assert leaves_equal(task.served_params(state), teacher)  # B = 0: the student is the teacher
    for _ in range(2):  # step 1 runs at learning rate 0 (warm-up)
        state, m = task.train_step(state, next(it), jax.random.key(3))
    assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0
    assert leaves_equal(state["teacher"], teacher)
    lora = LoRA.for_params(LoRASettings(4, 4.0, ATTN), teacher)
    merged = lora.merge(teacher, state["student"].ema_params)
    assert leaves_equal(task.served_params(state), merged)
    assert not leaves_equal(merged, teacher)


def test_apt_lora_trains_g_and_d_adapters_and_d_heads(teacher_dir):
    c = digits_apt.get_config("tiny")
    c.teacher_workdir = teacher_dir
    c.generator_workdir = teacher_dir
    c.update_from_flattened_dict(
        {"lora.rank": 4, "lora.alpha": 4.0, "lora.train_discriminator": True}
    )
    task = build_task(c, sharding.make_mesh({"data": 1}, jax.devices()[:1]))
    batch = next(task.make_iterator())
    state = task.init_state(jax.random.key(0))
    g, d = state["generator"], state["discriminator"]
    assert isinstance(g, LoRATrainState) and isinstance(d, LoRATrainState)
    assert d.lora.saved == (("heads",),) and "heads" not in {p[0] for p, _ in d.lora.targets}
    before = jax.tree.map(np.asarray, state)
    new, metrics = task.train_step(state, batch, jax.random.key(2))
    assert np.isfinite(float(metrics["g_loss"])) and np.isfinite(float(metrics["d_loss"]))
    for role in ("generator", "discriminator"):
        assert leaves_equal(new[role].base, before[role].base), role
        assert not leaves_equal(new[role].params, before[role].params), role
    # D's fresh heads train in full; they are part of its trained tree.
    assert not leaves_equal(
        new["discriminator"].params["heads"], before["discriminator"].base["heads"]
    )
    # G's step gradient flows through the merged weights into the adapters only.
    merged = model_params(new["generator"])
    assert not leaves_equal(merged, before["generator"].base)
    gen = make_generator(c)
    z = jnp.zeros((2, 8, 8, 1))
    out = gen.velocity(task.served_params(new), z, jnp.ones((2,)), jnp.zeros((2,), jnp.int32))
    assert np.all(np.isfinite(np.asarray(out)))
