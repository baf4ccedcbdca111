"""Convert MMDiT weights between diffusers and apt_jax.

diffusers SD3 transformer folder -> apt_jax params checkpoint (`config.init_from`):

  python launch/convert.py --diffusers sd3-medium/transformer --out ckpt/sd3-medium \
      [--dtype bfloat16] [--scan_layers] [--remat_policy full] [--overwrite]

apt_jax -> diffusers folder (`SD3Transformer2DModel.from_pretrained(DIR)` loads it):

  python launch/convert.py --to-diffusers --workdir RUN --out DIR [--ema|--noema]
  python launch/convert.py --to-diffusers --params CKPT --out DIR
      [--dtype bfloat16] [--max_shard_size 5GB]

From a run, the generator's EMA weights are exported by default (`--noema`: the
trained weights); a LoRA run's adapters are merged into their base first, or,
with `--lora`, written alone as a diffusers LoRA file that
`StableDiffusion3Pipeline.load_lora_weights(DIR)` reads:

  python launch/convert.py --to-diffusers --lora --workdir RUN --out DIR

Only the MMDiT is written: a class-conditional run's label
embedder has no diffusers counterpart and is left out.
"""

import os
import sys

# The installed apt_jax if there is one (`pip install .` or `-e .`), else this checkout's.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

_DIFFUSERS = flags.DEFINE_string("diffusers", None, "diffusers SD3 transformer folder to read.")
_TO_DIFFUSERS = flags.DEFINE_bool(
    "to-diffusers", False, "Write a diffusers folder from --workdir or --params."
)
flags.DEFINE_alias("to_diffusers", "to-diffusers")
_WORKDIR = flags.DEFINE_string("workdir", None, "A trained apt_jax run (with --to-diffusers).")
_PARAMS = flags.DEFINE_string(
    "params", None, "A params checkpoint from save_params (with --to-diffusers)."
)
_OUT = flags.DEFINE_string("out", None, "Output: params checkpoint or diffusers folder.")
_DTYPE = flags.DEFINE_enum(
    "dtype",
    None,
    ["float32", "bfloat16", "float16"],
    "Parameter dtype of the written checkpoint / folder (default float32).",
)
_SCAN = flags.DEFINE_bool("scan_layers", False, "Store the scanned (stacked) layout.")
_REMAT = flags.DEFINE_enum(
    "remat_policy", None, ["none", "full", "dots", "dots_no_batch"], "MMDiTConfig.remat_policy."
)
_VARIANT = flags.DEFINE_string("variant", None, "diffusers weight variant, e.g. fp16.")
_EMA = flags.DEFINE_bool("ema", True, "From a run: export the EMA weights (--noema: trained).")
_STEP = flags.DEFINE_integer("checkpoint_step", None, "From a run: checkpoint step (newest).")
_MAX_SHARD = flags.DEFINE_string("max_shard_size", None, "diffusers shard size, e.g. 5GB.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing params checkpoint.")
_LORA = flags.DEFINE_bool(
    "lora", False, "From a LoRA run: write its adapters alone (diffusers LoRA safetensors)."
)
flags.mark_flag_as_required("out")


def _mmdit_params(params):
    """The MMDiT of a generator's params (a label embedder is not exported)."""
    if isinstance(params, dict) and "mmdit" in params:
        dropped = sorted(k for k in params if k != "mmdit")
        if dropped:
            logging.info("Exporting only the MMDiT; not exported: %s.", dropped)
        params = params["mmdit"]
    return params


def from_diffusers() -> None:
    from apt_jax.convert import diffusers_sd3
    from apt_jax.convert.params_checkpoint import save_params

    overrides = {}
    if _REMAT.value is not None:
        overrides["remat_policy"] = _REMAT.value
    config, params = diffusers_sd3.load(
        _DIFFUSERS.value,
        dtype=_DTYPE.value,
        scan_layers=_SCAN.value,
        variant=_VARIANT.value,
        **overrides,
    )
    save_params(_OUT.value, config, params, overwrite=_OVERWRITE.value)
    print(
        f"Wrote {config.num_layers}-layer MMDiT ({config.param_dtype}, scan_layers="
        f"{config.scan_layers}) from {_DIFFUSERS.value} to {_OUT.value}"
    )


def to_diffusers() -> None:
    from apt_jax.convert import diffusers_sd3

    if _WORKDIR.value:
        from apt_jax.tasks.runs import load_run
        from apt_jax.train.config import mmdit_config

        task, state, step = load_run(_WORKDIR.value, _STEP.value)
        config = mmdit_config(task.config)
        if _LORA.value:
            write_adapters(task, state, config, step)
            return
        params = _mmdit_params(task.generator_weights(state, ema=_EMA.value).full())
        source = f"{_WORKDIR.value} step {step} ({'EMA' if _EMA.value else 'trained'} weights)"
    else:
        from apt_jax.convert.params_checkpoint import load_params

        config, params = load_params(_PARAMS.value)
        source = _PARAMS.value
    # diffusers_sd3.save lays scanned params out per layer itself.
    diffusers_sd3.save(
        config,
        params,
        _OUT.value,
        dtype=_DTYPE.value or "float32",
        max_shard_size=_MAX_SHARD.value,
    )
    print(f"Wrote diffusers SD3Transformer2DModel from {source} to {_OUT.value}")


def write_adapters(task, state, config, step) -> None:
    from apt_jax.convert import diffusers_lora

    weights = task.generator_weights(state, ema=_EMA.value)
    if weights.lora is None:
        raise app.UsageError(f"--lora: {_WORKDIR.value} is not a LoRA run (config.lora.rank 0).")
    path = diffusers_lora.save_adapters(config, weights.lora, weights.trained, _OUT.value)
    which = "EMA" if _EMA.value else "trained"
    print(f"Wrote the {which} LoRA adapters of {_WORKDIR.value} step {step} to {path}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    import jax

    jax.config.update("jax_threefry_partitionable", True)
    if _TO_DIFFUSERS.value:
        if _DIFFUSERS.value:
            raise app.UsageError("--diffusers is the input of the other direction.")
        if bool(_WORKDIR.value) == bool(_PARAMS.value):
            raise app.UsageError("--to-diffusers needs exactly one of --workdir or --params.")
        if _LORA.value and not _WORKDIR.value:
            raise app.UsageError("--lora needs --workdir (a LoRA run).")
        if _SCAN.value or _REMAT.value:
            raise app.UsageError("--scan_layers / --remat_policy only apply with --diffusers.")
        to_diffusers()
    else:
        if not _DIFFUSERS.value:
            raise app.UsageError("Pass --diffusers DIR, or --to-diffusers with --workdir/--params.")
        if _WORKDIR.value or _PARAMS.value:
            raise app.UsageError("--workdir / --params need --to-diffusers.")
        from_diffusers()


if __name__ == "__main__":
    from apt_jax import cli  # the console, and one line per user error

    cli.run(main, workdir=_WORKDIR)
