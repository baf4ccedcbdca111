"""Plan a TPU run without a TPU: compile a recipe's step for a named slice.

    from apt_jax.plan import topology
    topology.prepare_environment()          # before JAX starts a backend
    from apt_jax.plan.analysis import plan
    p = plan(config, topology.topology("v5e:4x4"))
    print(p.total_bytes, p.fits, p.flops_per_chip, p.step_time_bound_s)

One module per idea: `chips` (HBM, peak FLOP/s and bandwidth per generation,
with sources), `topology` (slice names -> libtpu devices, the environment),
`analysis` (build, compile, memory and cost), `loops` (loop bodies counted by
trip count), `model_flops` (6 N T and attention, per recipe), `roofline` (the
time bound), `find_batch` (the largest batch that fits), `report` (the
tables). `launch/compile.py` is the command line; docs/tpu_planning.md the
results.

This package's `__init__` imports nothing, so `topology.prepare_environment()`
can run before anything imports JAX.
"""
