"""Compile a recipe's train step for a TPU slice, here, without a TPU.

  python launch/compile.py --config configs/sd3_sft.py:sd3-medium --topology v5e-16
  python launch/compile.py --config configs/sd3_apt.py:sd3-medium --topology v5p:2x2x1 \
      --config.r1_mode=exact --find_batch --json plan.json
  python launch/compile.py --config configs/sd3_sft.py:test --topology v5e:2x2 --num_slices 2

Builds the recipe's real jitted step from the config alone (no data, no
weights), over `config.mesh` on the slice's devices (multislice: `data`
across slices unless `config.mesh.dcn` says otherwise), compiles it with the
TPU compiler (libtpu: `pip install -r requirements-tpu.txt`) and prints, per
chip: arguments, outputs, aliased, temp and total bytes against the chip's
HBM; the step's FLOPs (loops counted in full) and the model FLOPs; a roofline
lower bound on the step time. `--find_batch` searches the largest per-replica
batch that fits (`config.batch_size` is then that times data x fsdp). The
batch otherwise is `--config.batch_size` (global). Latents recipes compile at
SD3's 1024 px shapes unless `--config.data.latent_size` /
`--config.data.context_length` say otherwise. See docs/tpu_planning.md.
"""

import json
import os
import sys

# The installed apt_jax if there is one (`pip install .` or `-e .`), else this
# checkout's; the recipes import each other as the checkout's `configs` package.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from apt_jax.plan import topology  # noqa: E402  (imports no JAX)

# Before JAX is imported: the compile runs on the CPU, whatever the machine holds.
topology.prepare_environment()

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from apt_jax import cli  # noqa: E402
from apt_jax.errors import UserError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe config file.")
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU slice: 'v5e:4x4', 'v5p:2x2x1' or a Cloud type ('v5e-16', 'v5p-8')."
)
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices joined over DCN (multislice).")
_JSON = flags.DEFINE_string("json", None, "Also write the numbers to this JSON file.")
_FIND_BATCH = flags.DEFINE_bool(
    "find_batch", False, "Search the largest per-replica batch that fits the chip's HBM."
)
_MAX_BATCH = flags.DEFINE_integer("max_batch", 4096, "--find_batch looks no higher.")
flags.mark_flags_as_required(["config", "topology"])


def _plan(analysis, config, slice_):
    """`analysis.plan`, with a config that does not build reported as the user's error."""
    try:
        return analysis.plan(config, slice_)
    except UserError:
        raise
    except ValueError as e:  # the recipes' validation: a bad key, mesh or batch
        raise UserError(str(e)) from e


def main(argv):
    del argv
    from apt_jax.plan import analysis, find_batch, report
    from apt_jax.train import sharding

    config = _CONFIG.value
    slice_ = topology.topology(_TOPOLOGY.value, _NUM_SLICES.value)
    title = f"`{config.task}` step on {slice_.label} ({slice_.chip.name}, {slice_.chips} chips)"
    if not _FIND_BATCH.value:
        result = _plan(analysis, config, slice_)
        print(report.plan_table(result, title))
        payload = result.to_json()
    else:
        sized, _ = analysis.compile_config(config, slice_)
        divisor = sharding.batch_divisor(sharding.make_mesh(sized.mesh, devices=slice_.devices))
        accumulate = config.get("optimizer", {}).get("accumulation_steps", 1)

        def compile_at(per_replica: int):
            trial = config.copy_and_resolve_references()
            trial.batch_size = per_replica * divisor
            if trial.batch_size % accumulate:
                raise UserError(
                    f"batch {trial.batch_size} is not divisible by "
                    f"config.optimizer.accumulation_steps={accumulate}; set it to 1 to search."
                )
            plan = _plan(analysis, trial, slice_)
            print(
                f"batch {per_replica} per replica: {plan.total_bytes / 2**30:.2f} of "
                f"{plan.hbm_bytes / 2**30:.2f} GiB ({'fits' if plan.fits else 'does not fit'})",
                flush=True,
            )
            return plan

        search = find_batch.find_batch(compile_at, _MAX_BATCH.value)
        print()
        print(report.search_table(search))
        if search.best is not None:
            print()
            print(report.plan_table(search.best, title))
        payload = (search.best or search.tried[0]).to_json()
        payload["find_batch"] = {
            "largest_per_replica_batch": search.best.per_replica_batch if search.best else 0,
            "tried": [p.to_json() for p in search.tried],
        }
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(payload, f, indent=2)


if __name__ == "__main__":
    cli.run(main)
