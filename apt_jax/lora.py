"""LoRA as a transformation of the parameter pytree, not a second model.

A dense layer's kernel `W (in, out)` (or `(layers, in, out)` inside a scanned
run of blocks) is trained as `W + (alpha / rank) * A @ B` with `W` frozen and
the low-rank factors `A (in, rank)`, `B (rank, out)` trained; `B` starts at
zero, so the adapted model starts equal to its base, exactly. The model code
does not change: `merge(params, adapters)` builds the full parameter tree the
model is applied with, inside the jitted step, and gradients flow to the
factors through it. Only the factors (and any `modules_to_save`, trained in
full as in PEFT) carry optimizer state.

    lora = LoRA.for_params(LoRASettings(rank=16, alpha=16, target_modules=("to_q", "to_k")), params)
    adapters = lora.init(params)            # {"mmdit": {"transformer_blocks_0": {"attn":
                                            #   {"to_q": {"lora_A": (in, r), "lora_B": (r, out)}}}}}
    v = model.apply(lora.merge(params, adapters), ...)

Target patterns select modules by their path, the parameter path without the
leaf name, joined by "/", e.g. `mmdit/transformer_blocks_0/attn/to_q`:
  - "re:<regex>": the regex must match the whole path;
  - otherwise a glob (`fnmatch`, case-sensitive) matched against the whole
    path or any tail of it that starts at a path component: "to_q" selects
    every `.../to_q`, "attn/to_*" every projection of the joint attention,
    "mmdit/transformer_blocks_1/*" every dense layer of block 1.
Modules are dense layers: a "kernel" of 2 dims, or of 3 under a scanned run
(`transformer_blocks_{start}_{stop}`, leading layer axis; its blocks share one
pattern match). Patches (the 4-dim conv kernel) and embeddings are not.

Sharding: the factors carry logical names derived from their kernel's,
`A: (..., in_name, None)`, `B: (..., None, out_name)`, so the mesh rules shard
them like their base (fsdp splits `A` where it splits `W`'s input axis).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from apt_jax.errors import UserError
from apt_jax.models.partitioning import box, logical_names, unbox

Path = tuple[str, ...]
_SCANNED = re.compile(r"transformer_blocks_\d+_\d+")
LORA_A, LORA_B = "lora_A", "lora_B"


@dataclasses.dataclass(frozen=True)
class LoRASettings:
    """Rank, scale numerator and target patterns of the adapters.

    Attributes:
      rank: r of the factors (> 0).
      alpha: the update is `(alpha / rank) * A @ B` (PEFT's `lora_alpha`).
      target_modules: module path patterns (see the module docstring).
      modules_to_save: patterns of modules (or whole subtrees, e.g. "heads")
        trained in full beside the adapters; no adapter is put inside them.
      init_seed: seed of `A`'s initialisation.
    """

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    modules_to_save: tuple[str, ...] = ()
    init_seed: int = 0

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise UserError(f"lora rank={self.rank!r} must be a positive int.")
        if not self.alpha > 0:
            raise UserError(f"lora alpha={self.alpha!r} must be > 0 (PEFT's lora_alpha).")
        object.__setattr__(self, "target_modules", _patterns(self.target_modules))
        object.__setattr__(self, "modules_to_save", _patterns(self.modules_to_save))
        if not self.target_modules:
            raise UserError("lora target_modules is empty: name the dense layers to adapt.")
        for p in self.target_modules + self.modules_to_save:
            if p.startswith("re:"):
                try:
                    re.compile(p[3:])
                except re.error as e:
                    raise UserError(f"lora pattern {p!r} is not a valid regex: {e}.") from e

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank


def _patterns(value: str | Sequence[str]) -> tuple[str, ...]:
    """Comma-separated string (DiffSynth's `--lora_target_modules`) or sequence -> tuple."""
    if isinstance(value, str):
        value = value.split(",")
    return tuple(p.strip() for p in value if p.strip())


def settings_from_config(lora_config: Mapping[str, Any] | None) -> LoRASettings | None:
    """`LoRASettings` of `config.lora`, or None when LoRA is off (missing, or rank 0)."""
    if lora_config is None or int(lora_config.get("rank", 0)) == 0:
        return None
    return LoRASettings(
        rank=int(lora_config["rank"]),
        alpha=float(lora_config.get("alpha", lora_config["rank"])),
        target_modules=lora_config["target_modules"],
        modules_to_save=lora_config.get("modules_to_save", ()),
        init_seed=int(lora_config.get("init_seed", 0)),
    )


def matches(pattern: str, path: str) -> bool:
    """Whether module path `path` ("a/b/c") is selected by `pattern`."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], path) is not None
    return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, "*/" + pattern)


# ----------------------------------------------------------------------------- tree helpers
def _get(tree: Mapping, path: Path) -> Any:
    for name in path:
        tree = tree[name]
    return tree


def _set(tree: Mapping, path: Path, value: Any) -> dict:
    """A copy of `tree` with `path` set to `value` (copies only the dicts on the path)."""
    out = dict(tree)
    if len(path) == 1:
        out[path[0]] = value
    else:
        out[path[0]] = _set(tree.get(path[0], {}), path[1:], value)
    return out


def _walk(tree: Any, path: Path = ()):
    """(path, node) for every dict node of a nested-dict tree, parents first."""
    if isinstance(tree, Mapping):
        yield path, tree
        for k in sorted(tree):
            yield from _walk(tree[k], path + (str(k),))


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(unbox(x).shape)


def dense_modules(params: Mapping) -> dict[str, tuple[int, ...]]:
    """Module path -> kernel shape of every dense layer LoRA can adapt in `params`."""
    out = {}
    for path, node in _walk(params):
        kernel = node.get("kernel")
        if kernel is None or isinstance(kernel, Mapping):
            continue
        ndim = len(_shape(kernel))
        stacked = any(_SCANNED.fullmatch(p) for p in path)
        if ndim == 2 or (ndim == 3 and stacked):
            out["/".join(path)] = _shape(kernel)
    return out


def _describe(names: Sequence[str]) -> str:
    """Module names with block indices folded: transformer_blocks_{0-23}/attn/to_q."""
    groups: dict[str, list[int]] = {}
    for n in names:
        m = re.search(r"transformer_blocks_(\d+)(?=/)", n)
        if m:
            key = n[: m.start(1)] + "{}" + n[m.end(1) :]
            groups.setdefault(key, []).append(int(m.group(1)))
        else:
            groups.setdefault(n, [])
    out = []
    for key, idx in groups.items():
        if not idx:
            out.append(key)
            continue
        idx = sorted(idx)
        span = str(idx[0]) if len(idx) == 1 else f"{{{idx[0]}-{idx[-1]}}}"
        if len(idx) > 1 and idx != list(range(idx[0], idx[-1] + 1)):
            span = "{" + ",".join(map(str, idx)) + "}"
        out.append(key.replace("{}", span if len(idx) > 1 else str(idx[0])))
    return ", ".join(out)


# ----------------------------------------------------------------------------- LoRA
@dataclasses.dataclass(frozen=True)
class LoRA:
    """The adapters of one parameter tree: settings plus the resolved modules.

    Hashable and static (it travels in a train state's treedef, see
    `apt_jax.train.lora_state`).

    Attributes:
      settings: rank, alpha, patterns.
      targets: `(module path, kernel shape)` of every adapted dense layer, sorted.
      saved: paths of the modules (or subtrees) trained in full.
    """

    settings: LoRASettings
    targets: tuple[tuple[Path, tuple[int, ...]], ...]
    saved: tuple[Path, ...] = ()

    @classmethod
    def for_params(cls, settings: LoRASettings, params: Mapping) -> LoRA:
        """Resolves the patterns against `params` (arrays, boxed or abstract leaves).

        Raises:
          ValueError: a pattern of `target_modules` (or `modules_to_save`) that
            selects nothing, listing the modules that exist.
        """
        modules = dense_modules(params)
        saved = []
        for pattern in settings.modules_to_save:
            hits = [p for p, _ in _walk(params) if p and matches(pattern, "/".join(p))]
            if not hits:
                top = ", ".join(sorted(params))
                raise UserError(
                    f"lora modules_to_save pattern {pattern!r} matches no module; top-level "
                    f"names: {top}; dense modules: {_describe(sorted(modules))}."
                )
            saved += hits
        # A subtree trained in full holds no adapters; keep only outermost saved paths.
        saved = sorted(p for p in set(saved) if not any(p[: len(q)] == q for q in saved if q != p))
        inside_saved = (
            lambda name: any(  # noqa: E731
                tuple(name.split("/"))[: len(q)] == q for q in saved
            )
        )
        chosen = set()
        for pattern in settings.target_modules:
            hits = [n for n in modules if matches(pattern, n)]
            if not hits:
                raise UserError(
                    f"lora target_modules pattern {pattern!r} matches no dense module. "
                    f"Modules that exist ({len(modules)}): {_describe(sorted(modules))}. "
                    "Patterns are globs on these paths (or on their tails, e.g. 'to_q', "
                    "'attn/to_*') or 're:<regex>' on the whole path."
                )
            chosen.update(n for n in hits if not inside_saved(n))
        targets = tuple((tuple(n.split("/")), modules[n]) for n in sorted(chosen))
        return cls(settings, targets, tuple(saved))

    @property
    def module_names(self) -> tuple[str, ...]:
        """The adapted modules' paths, "a/b/c"."""
        return tuple("/".join(p) for p, _ in self.targets)

    def init(self, params: Mapping, rng: jax.Array | None = None) -> dict:
        """Fresh adapters (and copies of `modules_to_save`) for `params`.

        `A` is uniform in `+-1 / sqrt(in)` (PEFT's default, Kaiming-uniform with
        a = sqrt(5)), `B` is zero, both float32. Boxed kernels give boxed
        factors with derived logical names; unboxed give arrays.

        Args:
          params: the base tree (the one `for_params` resolved against).
          rng: PRNG key; default `jax.random.key(settings.init_seed)`.

        Returns:
          A nested dict mirroring `params` on the adapted paths, each module
          `{"lora_A": (..., in, r), "lora_B": (..., r, out)}`.
        """
        r = self.settings.rank
        rng = jax.random.key(self.settings.init_seed) if rng is None else rng
        out: dict = {}
        for i, (path, shape) in enumerate(self.targets):
            kernel = _get(params, path + ("kernel",))
            names = logical_names(kernel)
            *lead, fan_in, fan_out = shape
            bound = 1.0 / fan_in**0.5
            a = jax.random.uniform(
                jax.random.fold_in(rng, i), (*lead, fan_in, r), jnp.float32, -bound, bound
            )
            b = jnp.zeros((*lead, r, fan_out), jnp.float32)
            a_names = b_names = None
            if names is not None:
                a_names = (*names[:-1], None)
                b_names = (*names[:-2], None, names[-1])
            module = {LORA_A: box(a, a_names), LORA_B: box(b, b_names)}
            out = _set(out, path, module)
        for path in self.saved:
            out = _set(out, path, jax.tree.map(jnp.copy, _get(params, path)))
        return out

    def delta(self, adapters: Mapping, path: Path) -> jax.Array:
        """`(alpha / r) * A @ B` of module `path`, float32, shaped like its kernel."""
        m = _get(adapters, path)
        ab = jnp.einsum("...ir,...ro->...io", m[LORA_A], m[LORA_B])
        return self.settings.scale * ab

    def merge(self, params: Mapping, adapters: Mapping) -> dict:
        """The full parameter tree: `W + (alpha / r) A B` on every adapted kernel.

        The merged kernel has the dtype of `W` and the factors promoted
        together (float32 for float32 or bfloat16 bases), so a small update
        is not rounded away into a bfloat16 base. With `B = 0` the result
        equals `params` exactly. `modules_to_save` subtrees come from `adapters`.
        """
        out = dict(params)
        for path, _ in self.targets:
            kernel = _get(params, path + ("kernel",))
            dtype = jnp.result_type(kernel.dtype, jnp.float32)
            merged = kernel.astype(dtype) + self.delta(adapters, path).astype(dtype)
            out = _set(out, path + ("kernel",), merged)
        for path in self.saved:
            out = _set(out, path, _get(adapters, path))
        return out

    def check_adapters(self, adapters: Mapping) -> None:
        """Raises ValueError if `adapters` lack a module or have the wrong shapes."""
        r = self.settings.rank
        for path, shape in self.targets:
            name = "/".join(path)
            try:
                m = _get(adapters, path)
            except (KeyError, TypeError):
                raise UserError(f"adapters lack module {name}.") from None
            *lead, fan_in, fan_out = shape
            want = {LORA_A: (*lead, fan_in, r), LORA_B: (*lead, r, fan_out)}
            for k, s in want.items():
                if k not in m or _shape(m[k]) != s:
                    got = _shape(m[k]) if k in m else None
                    raise UserError(f"adapters {name}/{k}: shape {got}, expected {s}.")
