"""Linen's logical-partitioning helpers, re-exported so that code outside
`apt_jax.models` never imports `flax.linen` itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh

Rules = Sequence[tuple[str, Any]]


def logical_shardings(boxed_abstract: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a tree whose leaves may be `nn.LogicallyPartitioned`.

    Leaves without logical names (a step counter, optimizer scalars) are
    replicated.
    """
    specs = nn.get_partition_spec(boxed_abstract)
    return nn.logical_to_mesh_sharding(specs, mesh, [tuple(r) for r in rules])


def unbox(tree: Any) -> Any:
    """Strips `nn.LogicallyPartitioned` boxes, leaving plain arrays."""
    return nn.meta.unbox(tree)


@contextlib.contextmanager
def axis_rules(rules: Rules, mesh: Mesh | None = None):
    """Context in which the models' `with_logical_constraint`s resolve to `mesh`.

    Enter it inside the traced function (the constraints are placed at trace
    time). Without a mesh the constraints are no-ops (single device).
    """
    with contextlib.ExitStack() as stack:
        if mesh is not None:
            # Inside jit only the abstract mesh may be set.
            stack.enter_context(jax.sharding.use_abstract_mesh(mesh.abstract_mesh))
        stack.enter_context(nn.logical_axis_rules([tuple(r) for r in rules]))
        yield


def logical_names(x: Any) -> tuple | None:
    """The logical axis names of a boxed leaf (`nn.LogicallyPartitioned`), None if unboxed."""
    return tuple(x.names) if isinstance(x, nn.LogicallyPartitioned) else None


def box(value: Any, names: tuple | None) -> Any:
    """`value` boxed with logical axis `names` (returned as is when `names` is None)."""
    return value if names is None else nn.LogicallyPartitioned(value, names)
