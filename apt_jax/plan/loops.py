"""Step FLOPs and bytes with every `while` loop counted as often as it runs.

XLA's `cost_analysis()` walks a compiled module once: a `while` body counts
once, whatever its trip count. A scanned MMDiT (`scan_layers=True`) runs its
blocks in such loops (one for the forward pass, one for the backward), as do
the teacher's ODE in on-the-fly distillation and gradient accumulation, so
the raw count of an SD3 step is a few layers' worth. This module reads the
compiled HLO text, finds each loop's trip count from its condition, its
counter update and its initial value, costs each loop body on its own (a
module whose entry is the body, through XLA's own `HloCostAnalysis`) and adds
`(trip - 1)` more copies of it, nested loops included:

    corrected(c) = cost(c) + sum over loops w in c of
                   [trip(w) * corrected(body(w)) - cost(body(w))]

`tests/test_compile.py` checks the result against the compile of the same
model with its layers unrolled.

The HLO text and `hlo_module_cost_analysis` are jaxlib internals (pinned with
jax in requirements.txt); a loop whose trip count cannot be read raises
`LoopAnalysisError`, so a wrong count is never reported silently.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax

# jaxlib internals: the HLO parser and XLA's cost analysis of a parsed module.
from jax._src.lib import xla_client as _xc


class LoopAnalysisError(RuntimeError):
    """A `while` loop whose trip count the HLO does not show in a form read here."""


@dataclasses.dataclass(frozen=True)
class Loop:
    """One `while` loop of a compiled module.

    Attributes:
      name: the `while` instruction.
      body: its body computation.
      trip_count: iterations it runs.
      flops, bytes_accessed: one iteration's cost, inner loops counted in full.
    """

    name: str
    body: str
    trip_count: int
    flops: float
    bytes_accessed: float


@dataclasses.dataclass(frozen=True)
class LoopCost:
    """A module's cost with loops counted `trip_count` times.

    Attributes:
      flops, bytes_accessed: the whole module's, corrected.
      raw_flops, raw_bytes_accessed: XLA's count (each loop body once).
      loops: every loop, inner loops before the loop holding them.
    """

    flops: float
    bytes_accessed: float
    raw_flops: float
    raw_bytes_accessed: float
    loops: tuple[Loop, ...]


# ------------------------------------------------------------------ parsing
_HEADER = re.compile(r"^(ENTRY )?%([\w.\-]+) ")
_INSTR = re.compile(r"^\s*(ROOT )?%([\w.\-]+) = (.*)$")
_WHILE = re.compile(r"\swhile\((%[\w.\-]+)\), condition=%([\w.\-]+), body=%([\w.\-]+)")
_CALLS = re.compile(r"(?:calls|to_apply|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_FRAME_ID = re.compile(r" stack_frame_id=\d+")
_OPCODE = re.compile(r"(?:^|\s)([a-z][a-z0-9_\-]*)\(")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass
class _Computation:
    name: str
    text: str
    instrs: dict[str, str]  # instruction name -> the text after "= "
    root: str


def _split(module_text: str) -> tuple[str, dict[str, _Computation], str]:
    """(header line, computations by name, entry name) of an HLO module's text."""
    header, _, rest = module_text.partition("\n")
    comps: dict[str, _Computation] = {}
    entry = None
    current: list[str] = []
    for line in rest.splitlines():
        if not current:
            if _HEADER.match(line):
                current = [line]
            continue
        current.append(line)
        if line == "}":
            is_entry, name = _HEADER.match(current[0]).groups()
            instrs, root = {}, ""
            for body_line in current[1:-1]:
                m = _INSTR.match(body_line)
                if m:
                    instrs[m.group(2)] = m.group(3)
                    if m.group(1):
                        root = m.group(2)
            comps[name] = _Computation(name, "\n".join(current), instrs, root)
            if is_entry:
                entry = name
            current = []
    if entry is None:
        raise LoopAnalysisError("The HLO module text has no ENTRY computation.")
    return header, comps, entry


def _operands(rhs: str, opcode: str) -> list[str]:
    """Operand names of an instruction `<shape> opcode(%a, %b), ...`."""
    m = re.search(rf"\s{re.escape(opcode)}\(([^)]*)\)", rhs)
    if not m:
        return []
    return [o.strip().lstrip("%") for o in m.group(1).split(",") if o.strip().startswith("%")]


def _opcode(rhs: str) -> str:
    # "<shape> opcode(...)": inside a shape only layout tags (`T(8,128)`, `S(1)`,
    # upper case) meet a parenthesis, so the first lower-case word before one is it.
    m = _OPCODE.search(rhs)
    return m.group(1) if m else ""


def _value(comp: _Computation, name: str, comps: dict[str, _Computation], args=None):
    """An s32 scalar expression: ("const", v), ("param", tuple index) or None.

    `args` maps a fused computation's parameter numbers to the fusion's values.
    """
    rhs = comp.instrs.get(name)
    if rhs is None:
        return None
    op = _opcode(rhs)
    if op == "constant":
        m = re.search(r"constant\((-?\d+)\)", rhs)
        return ("const", int(m.group(1))) if m else None
    if op == "get-tuple-element":
        src = _operands(rhs, op)
        if src and _opcode(comp.instrs.get(src[0], "")) == "parameter":
            return ("param", int(re.search(r"index=(\d+)", rhs).group(1)))
        return None
    if op == "parameter" and args is not None:
        return args[int(re.search(r"parameter\((\d+)\)", rhs).group(1))]
    if op in ("copy", "bitcast", "convert"):
        src = _operands(rhs, op)
        return _value(comp, src[0], comps, args) if src else None
    return None


def _counter_condition(cond: _Computation, comps: dict[str, _Computation]):
    """(tuple index of the counter, bound, direction) read from a loop condition."""
    rhs = cond.instrs[cond.root]
    comp, args = cond, None
    if _opcode(rhs) == "fusion":
        fused = comps[_CALLS.search(rhs).group(1)]
        args = [_value(cond, o, comps) for o in _operands(rhs, "fusion")]
        comp, rhs = fused, fused.instrs[fused.root]
    if _opcode(rhs) != "compare":
        raise LoopAnalysisError(f"Loop condition {cond.name} does not end in a compare.")
    a, b = (_value(comp, o, comps, args) for o in _operands(rhs, "compare"))
    direction = re.search(r"direction=(\w+)", rhs).group(1)
    flip = {"LT": "GT", "LE": "GE", "GT": "LT", "GE": "LE", "NE": "NE"}
    if a and b and a[0] == "const" and b[0] == "param":
        a, b, direction = b, a, flip.get(direction, direction)
    if not (a and b and a[0] == "param" and b[0] == "const"):
        raise LoopAnalysisError(f"Loop condition {cond.name} is not `counter <op> constant`.")
    return a[1], b[1], direction


def _counter_step(body: _Computation, index: int, comps: dict[str, _Computation]) -> int:
    """The constant the body adds to tuple element `index` each iteration."""
    root = body.instrs[body.root]
    if _opcode(root) != "tuple":
        raise LoopAnalysisError(f"Loop body {body.name} does not return a tuple.")
    update = _operands(root, "tuple")[index]
    rhs = body.instrs.get(update, "")
    op = _opcode(rhs)
    if op in ("add", "subtract"):
        x, y = (_value(body, o, comps) for o in _operands(rhs, op))
        if op == "add" and y == ("param", index) and x and x[0] == "const":
            x, y = y, x
        if x == ("param", index) and y and y[0] == "const":
            return y[1] if op == "add" else -y[1]
    raise LoopAnalysisError(f"Loop body {body.name} does not step its counter by a constant.")


def _initial(caller: _Computation, operand: str, index: int, comps) -> int:
    """The counter's initial value: element `index` of the loop's tuple operand."""
    rhs = caller.instrs.get(operand, "")
    if _opcode(rhs) == "tuple":
        value = _value(caller, _operands(rhs, "tuple")[index], comps)
        if value and value[0] == "const":
            return value[1]
    raise LoopAnalysisError(f"The initial counter of the loop over {operand} is not a constant.")


def trip_count(caller: _Computation, while_rhs: str, comps: dict[str, _Computation]) -> int:
    """Iterations of the `while` instruction `while_rhs` of `caller`."""
    known = _TRIP.search(while_rhs)
    if known:
        return int(known.group(1))
    operand, cond, body = _WHILE.search(" " + while_rhs).groups()
    index, bound, direction = _counter_condition(comps[cond], comps)
    step = _counter_step(comps[body], index, comps)
    start = _initial(caller, operand.lstrip("%"), index, comps)
    span = bound - start
    if direction in ("LT", "NE") and step > 0:
        return max(0, math.ceil(span / step))
    if direction == "LE" and step > 0:
        return max(0, span // step + 1)
    if direction in ("GT", "NE") and step < 0:
        return max(0, math.ceil(-span / -step))
    if direction == "GE" and step < 0:
        return max(0, (-span) // (-step) + 1)
    raise LoopAnalysisError(f"Loop {cond}: direction {direction} with step {step} never ends.")


# -------------------------------------------------------------------- costs
def _cpu_client():
    return jax.devices("cpu")[0].client


def _cost(module_text: str) -> tuple[float, float]:
    # The text's stack frame ids point into a table the printer leaves out: drop
    # them, or the parser warns about every one.
    module = _xc.hlo.hlo_module_from_text(_FRAME_ID.sub("", module_text))
    cost = _xc._xla.hlo_module_cost_analysis(_cpu_client(), module)
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def _as_entry(header: str, comps: dict[str, _Computation], entry: str) -> str:
    """Module text with `entry` as its ENTRY (the others kept, uncalled ones ignored)."""
    partitions = re.search(r"num_partitions=\d+", header)
    out = ["HloModule loop_body" + (f", {partitions.group(0)}" if partitions else ""), ""]
    for name, comp in comps.items():
        text = comp.text[len("ENTRY ") :] if comp.text.startswith("ENTRY ") else comp.text
        out += ["ENTRY " + text if name == entry else text, ""]
    return "\n".join(out)


def loop_corrected_cost(module_text: str) -> LoopCost:
    """The cost of an HLO module (`compiled.as_text()`) with loops fully counted.

    Raises:
      LoopAnalysisError: a loop whose trip count cannot be read.
    """
    header, comps, entry = _split(module_text)
    own: dict[str, tuple[float, float]] = {}
    loops: list[Loop] = []

    def cost_of(name: str) -> tuple[float, float]:
        if name not in own:
            own[name] = _cost(_as_entry(header, comps, name))
        return own[name]

    def extra(name: str, seen: tuple[str, ...] = ()) -> tuple[float, float]:
        """Corrected minus XLA's count, for computation `name` as XLA walks it."""
        comp = comps[name]
        add_flops = add_bytes = 0.0
        for instr, rhs in comp.instrs.items():
            w = _WHILE.search(" " + rhs)
            if w:
                body = w.group(3)
                trips = trip_count(comp, rhs, comps)
                flops, nbytes = cost_of(body)
                inner_flops, inner_bytes = extra(body, (*seen, name))
                loops.append(
                    Loop(
                        name=instr,
                        body=body,
                        trip_count=trips,
                        flops=flops + inner_flops,
                        bytes_accessed=nbytes + inner_bytes,
                    )
                )
                add_flops += trips * (flops + inner_flops) - flops
                add_bytes += trips * (nbytes + inner_bytes) - nbytes
                continue
            callees = _CALLS.findall(rhs)
            branches = _BRANCHES.search(rhs)
            if branches:
                callees += [b.strip().lstrip("%") for b in branches.group(1).split(",")]
            for callee in callees:
                if callee in comps and callee not in seen and has_loop(callee):
                    f, b = extra(callee, (*seen, name))
                    add_flops, add_bytes = add_flops + f, add_bytes + b
        return add_flops, add_bytes

    looping: dict[str, bool] = {}

    def has_loop(name: str) -> bool:
        """Whether computation `name`, or one it calls, holds a `while`."""
        if name not in looping:
            looping[name] = False  # a guard against cycles while this one is open
            rhss = comps[name].instrs.values()
            looping[name] = any(_WHILE.search(" " + r) for r in rhss) or any(
                c in comps and has_loop(c) for r in rhss for c in _CALLS.findall(r)
            )
        return looping[name]

    raw_flops, raw_bytes = _cost(module_text)
    add_flops, add_bytes = extra(entry)
    return LoopCost(
        flops=raw_flops + add_flops,
        bytes_accessed=raw_bytes + add_bytes,
        raw_flops=raw_flops,
        raw_bytes_accessed=raw_bytes,
        loops=tuple(loops),
    )
