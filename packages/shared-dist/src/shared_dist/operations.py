"""Cross-process operations over (nested) tensors, built on ``torch.distributed``.

Everything here works the same whether the process group was started by
``accelerate launch`` (``Accelerator`` / ``PartialState``), by ``torchrun`` or by a
plain ``torch.distributed.init_process_group``: the functions only look at the
default (or given) process group. With no process group they are identities.

Gradient rule of :func:`gather`
-------------------------------
The backward pass of ``gather`` SUMS, over all ranks, the gradient each rank's loss
sends to a row, and hands each rank the rows it contributed. DDP then AVERAGES
parameter gradients over ranks. Together: if every rank computes a loss ``L_r`` from
the gathered tensor, each rank's parameters receive the gradient of
``mean_r L_r`` computed in ONE process on the concatenated batch. Two uses follow:

* global loss, same on every rank (``L_r = L(all rows)``): DDP's gradient equals
  the single-process gradient of ``L``;
* local queries x gathered keys (``L_r`` = mean over rank ``r``'s queries): DDP's
  gradient equals the single-process gradient of the mean over ranks, which is the
  mean over all queries when ranks hold equal batch sizes.

Every rank must call ``gather`` (forward) and back-propagate through its output
(backward): both passes are collectives. A rank whose loss does not depend on the
gathered tensor never runs the backward collective and the others wait for it.

Debug mode
----------
Set ``SHARED_DIST_DEBUG=1`` (``ACCELERATE_DEBUG_MODE=1`` is honoured too) to make
every operation first meet at a monitored barrier (gloo names a rank that never
arrives instead of hanging) and compare the full structure, shapes, dtypes and
devices of the inputs of every rank, raising :class:`DistributedOperationError`
that lists every rank's shapes. Without debug mode, mismatched trailing shapes or
dtypes of a gathered tensor are still caught (the sizes travel with them), and
``reduce`` compares a checksum of the structure and shapes first (one small all-reduce).

Bounded waits
-------------
Every collective of this package, the object ones included, waits at most
``SHARED_DIST_TIMEOUT`` seconds (default 600) for the other ranks, then raises
:class:`DistributedOperationError`: a rank that raised and went on to another
collective, or died, never hangs the rest for the process group's 30 minutes.

Exit
----
Importing this module registers one ``gc.collect()`` at interpreter exit (``atexit``). With gloo, a
``DistributedDataParallel`` module or a collective's autograd graph left as cyclic garbage is
otherwise freed during interpreter finalization, where torch can abort a finished run
(SIGABRT, "terminate called without an active exception"), whether or not the process group was
destroyed. Collecting it while the interpreter is alive costs one garbage-collector pass.
A process group left open until exit can abort a finished gloo run as well, in plain torch too (4 of
80 two-process runs of ``torch.distributed.nn.functional.all_gather``): close the group you open
(``destroy_process_group()``; accelerate's ``end_training()``). This package never closes a group it
did not open.
"""

from __future__ import annotations

import atexit
import gc
import math
import os
import pickle
import weakref
import zlib
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from itertools import count
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistributedOperationError",
    "barrier",
    "broadcast_object",
    "check_same",
    "gather",
    "gather_object",
    "get_rank",
    "get_world_size",
    "is_debug_mode",
    "is_distributed",
    "local_slice",
    "next_index",
    "reduce",
]

# torch 2.13 renamed the single-tensor collectives; older releases only have the
# *_tensor spelling (deprecated, with a FutureWarning, from 2.13 on).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_to_all_single = dist.all_to_all_single

_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.complex64,
    torch.complex128,
)
_MAX_TRAILING = 6
# [rows, ndim, dtype code, numel of one row, structure checksum, first _MAX_TRAILING trailing dims (-1 pad)]
_META_LEN = 5 + _MAX_TRAILING


# See "Exit" above: free DDP modules and collectives' graphs while the interpreter is alive (torch
# 2.13, gloo: 14 of 60 two-process runs of a prepared model aborted at exit, 0 of 60 with this).
atexit.register(gc.collect)


class DistributedOperationError(RuntimeError):
    """Raised when ranks call a collective with inputs that cannot be combined."""


# ----------------------------------------------------------------------------- state


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def get_world_size(group: dist.ProcessGroup | None = None) -> int:
    """Processes in ``group`` (default: the world); 1 without an initialised process group."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def get_rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank in ``group`` (default: the world); 0 without an initialised process group."""
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def is_debug_mode() -> bool:
    """Whether ``SHARED_DIST_DEBUG`` or accelerate's ``ACCELERATE_DEBUG_MODE`` is set to a true value."""
    flags = (os.environ.get("SHARED_DIST_DEBUG", ""), os.environ.get("ACCELERATE_DEBUG_MODE", ""))
    # accelerate's truthy values (accelerate.utils.str_to_bool), so ACCELERATE_DEBUG_MODE reads alike
    return any(f.strip().lower() in ("y", "yes", "t", "true", "on", "1") for f in flags)


def _env_seconds(name: str, default: str) -> float:
    """A number of seconds from the environment variable ``name``; an error that names it otherwise."""
    raw = os.environ.get(name, default)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"the environment variable {name} must be a number of seconds >= 0, got {raw!r}")
    return seconds


def _collective_timeout() -> timedelta | None:
    """How long a tensor collective of this package waits for the other ranks (SHARED_DIST_TIMEOUT,
    seconds; default 600, NCCL's own default; 0: the process group's timeout, 30 min on gloo)."""
    seconds = _env_seconds("SHARED_DIST_TIMEOUT", "600")
    return timedelta(seconds=seconds) if seconds > 0 else None


def _failed(op: str, err: Exception, group: dist.ProcessGroup | None) -> DistributedOperationError:
    timeout = _collective_timeout()
    return DistributedOperationError(
        f"{op} on rank {dist.get_rank(group)} failed: the other ranks did not complete it (this rank "
        f"waits at most {timeout or 'the process group timeout'}, SHARED_DIST_TIMEOUT) — one of them "
        f"raised, exited, or is in a different collective; SHARED_DIST_DEBUG=1 names the ranks that do "
        f"not arrive ({err})"
    )


def _wait(op: str, work: dist.Work, group: dist.ProcessGroup | None) -> None:
    """Wait for an async collective, bounded: a rank that raised (and went on to another
    collective, or exited) makes the others fail with this message instead of hanging."""
    timeout = _collective_timeout()
    try:
        work.wait(timeout) if timeout is not None else work.wait()
    except RuntimeError as err:
        raise _failed(op, err, group) from err


def _debug_timeout() -> timedelta:
    return timedelta(seconds=_env_seconds("SHARED_DIST_DEBUG_TIMEOUT", "60"))


# ----------------------------------------------------------------------------- nested data


def _map(fn: Callable[[torch.Tensor], Any], data: Any, path: str = "") -> Any:
    """Apply ``fn`` to every tensor leaf of nested dicts/lists/tuples, keeping the structure.

    Dict leaves are visited in SORTED key order, whatever order each rank inserted them in:
    ``fn`` is a collective, so every rank must reach the leaves in the same order."""
    if isinstance(data, torch.Tensor):
        return fn(data)
    if isinstance(data, Mapping):
        done = {k: _map(fn, data[k], f"{path}.{k}") for k in sorted(data, key=repr)}
        return type(data)({k: done[k] for k in data})  # the caller's own key order
    if isinstance(data, tuple) and hasattr(data, "_fields"):  # namedtuple
        return type(data)(*(_map(fn, v, f"{path}[{i}]") for i, v in enumerate(data)))
    if isinstance(data, (list, tuple)):
        return type(data)(_map(fn, v, f"{path}[{i}]") for i, v in enumerate(data))
    raise TypeError(
        f"expected a tensor or nested dict/list/tuple of tensors, got {type(data).__name__}"
        f" at data{path or ''}"
    )


def _describe(data: Any) -> Any:
    """A picklable description of a nested structure, for debug-mode comparisons."""
    if isinstance(data, torch.Tensor):
        return (tuple(data.shape), str(data.dtype), data.device.type)
    if isinstance(data, Mapping):
        return {k: _describe(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_describe(v) for v in data]
    return type(data).__name__


def _trailing(desc: Any) -> Any:
    """Drop dim 0 of every leaf: what must agree across ranks for a gather."""
    if isinstance(desc, tuple):
        shape, dtype, device = desc
        return (shape[1:] if len(shape) else (), dtype, device)
    if isinstance(desc, dict):
        return {k: _trailing(v) for k, v in desc.items()}
    if isinstance(desc, list):
        return [_trailing(v) for v in desc]
    return desc


def _debug_check(op: str, data: Any, group: dist.ProcessGroup | None, same_shape: bool) -> None:
    if dist.get_backend(group) == dist.Backend.GLOO:
        try:
            dist.monitored_barrier(group, timeout=_debug_timeout(), wait_all_ranks=True)
        except RuntimeError as err:
            raise DistributedOperationError(
                f"{op}: not every rank reached the collective within {_debug_timeout()}: {err}"
            ) from err
    descs = _gather_objects(op, _describe(data), group)
    key = (lambda d: d) if same_shape else _trailing
    if any(key(d) != key(descs[0]) for d in descs):
        lines = "\n".join(f"  rank {r}: {d}" for r, d in enumerate(descs))
        what = "the same shapes" if same_shape else "the same structure, trailing shapes and dtypes"
        raise DistributedOperationError(f"{op}: every rank must pass {what}; got\n{lines}")


# ----------------------------------------------------------------------------- gather


def _check_device(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    backend = dist.get_backend(group)
    if backend == dist.Backend.NCCL and tensor.device.type != "cuda":
        raise DistributedOperationError(
            f"gather: the NCCL backend needs CUDA tensors, got a tensor on {tensor.device}"
        )
    if backend == dist.Backend.GLOO and tensor.device.type not in ("cpu", "cuda"):
        raise DistributedOperationError(
            f"gather: the gloo backend takes CPU (or CUDA) tensors, got one on {tensor.device}"
        )


def _row_meta(tensor: torch.Tensor, op: str, structure: int) -> list[int]:
    """[rows, ndim, dtype code, numel of one row, structure checksum, trailing dims padded with -1]:
    what ranks must agree on."""
    if tensor.dtype not in _DTYPES:
        raise TypeError(f"{op}: unsupported dtype {tensor.dtype}")
    trailing = list(tensor.shape[1:])
    meta = [tensor.shape[0], tensor.dim(), _DTYPES.index(tensor.dtype), int(torch.Size(trailing).numel())]
    return [*meta, structure, *(trailing + [-1] * _MAX_TRAILING)[:_MAX_TRAILING]]


def _structure_checksum(data: Any) -> int:
    """CRC-32 of the nested structure alone: container types, dict keys (sorted, as ``_map`` visits
    them), the number and order of tensors. Shapes and dtypes are compared leaf by leaf (``_check_meta``)."""

    def skeleton(d: Any) -> Any:
        if isinstance(d, torch.Tensor):
            return "t"
        if isinstance(d, Mapping):
            return ("dict", [(repr(k), skeleton(d[k])) for k in sorted(d, key=repr)])
        return (type(d).__name__, [skeleton(v) for v in d])

    _map(lambda t: t, data)  # type-checks the leaves first
    return zlib.crc32(repr(skeleton(data)).encode())


class _StructureMismatch(DistributedOperationError):
    """Raised on every rank at once when the structure checksums in a gather's metadata differ."""


def _check_meta(table: list[list[int]], op: str) -> None:
    if any(row[4] != table[0][4] for row in table):
        raise _StructureMismatch(op)
    if any(row[1:] != table[0][1:] for row in table):
        lines = "\n".join(
            f"  rank {r}: rows={row[0]}, ndim={row[1]}, dtype={_DTYPES[row[2]]}, "
            f"trailing dims={[d for d in row[5:] if d >= 0]}"
            for r, row in enumerate(table)
        )
        raise DistributedOperationError(
            f"{op}: tensors must agree on every dim but dim 0 and on dtype across ranks; got\n" + lines
        )


def _all_gather_coalesced(
    outputs: list[torch.Tensor], inputs: list[torch.Tensor], group: dist.ProcessGroup | None
) -> list[dist.Work]:
    """All-gather several uint8 buffers in one collective where the backend can (NCCL, gloo on CPU),
    else in as many, all in flight at once."""
    backend, device = dist.get_backend(group), inputs[0].device.type
    pg = group if group is not None else dist.group.WORLD
    one_op = getattr(pg, "allgather_into_tensor_coalesced", None)
    if one_op is not None and (
        backend == dist.Backend.NCCL or (backend == dist.Backend.GLOO and device == "cpu")
    ):
        return [one_op(outputs, inputs)]
    return [_all_gather_single(o, i, group=group, async_op=True) for o, i in zip(outputs, inputs)]


# Per process group and (operation, leaf): the bytes of the largest rank's data in the previous
# call, rounded up to _ALIGN. The next call sends its data padded to this bound in the SAME
# collective as the sizes, instead of exchanging sizes first: one round trip while sizes repeat.
# Every rank derives the bound from the same gathered sizes, so all ranks agree on it; a call whose
# data do not fit sends them again at the new bound (two round trips, like a first call).
_BOUNDS: weakref.WeakKeyDictionary[Any, dict[tuple[str, int], int]] = weakref.WeakKeyDictionary()
_ALIGN = 16  # every rank's slice of the received bytes starts aligned for any dtype (complex128)


def _fit(data: torch.Tensor, bound: int) -> torch.Tensor:
    """``data`` (bytes) cut or zero-padded to ``bound`` bytes; no copy when it already has that size."""
    if data.numel() >= bound:
        return data[:bound]
    return torch.cat([data, data.new_zeros(bound - data.numel())])


def _all_gather_rows(
    x: torch.Tensor, group: dist.ProcessGroup | None, op: str, slot: int, structure: int = 0
) -> tuple[torch.Tensor, list[int]]:
    """Every rank's rows of ``x`` in rank order, and each rank's row count (not differentiable).

    The data travel as bytes so that the buffers every rank exchanges have the same size whatever the
    ranks pass: a mismatch of shapes or dtypes is reported from the metadata, never hangs the transfer."""
    world, itemsize = dist.get_world_size(group), x.element_size()
    bounds = _BOUNDS.setdefault(group if group is not None else dist.group.WORLD, {})
    bound = bounds.get((op, slot), 0)
    flat = x.contiguous().view(-1)
    data = flat.view(torch.uint8) if flat.numel() else x.new_empty(0, dtype=torch.uint8)  # (bytes,), no copy
    meta = torch.tensor(_row_meta(x, op, structure), dtype=torch.int64, device=x.device)
    metas = torch.empty(world * _META_LEN, dtype=torch.int64, device=x.device)  # (W * _META_LEN,)
    out = torch.empty(world * bound, dtype=torch.uint8, device=x.device)  # (W * bound,)
    if bound:
        works = _all_gather_coalesced(
            [metas.view(torch.uint8), out], [meta.view(torch.uint8), _fit(data, bound)], group
        )
    else:  # no bound yet for this slot: the sizes alone
        works = [_all_gather_single(metas, meta, group=group, async_op=True)]
    for work in works:
        _wait(op, work, group)
    table = metas.view(world, _META_LEN).tolist()
    _check_meta(table, op)
    rows = [row[0] for row in table]
    nbytes = [row[0] * row[3] * itemsize for row in table]
    bounds[(op, slot)] = -(-max(nbytes) // _ALIGN) * _ALIGN
    if max(nbytes) > bound:  # some rank's data did not fit: all of them again, at the new bound
        bound = bounds[(op, slot)]
        out = torch.empty(world * bound, dtype=torch.uint8, device=x.device)
        _wait(op, _all_gather_single(out, _fit(data, bound), group=group, async_op=True), group)
    shape = (sum(rows), *x.shape[1:])
    if all(n == bound for n in nbytes):  # equal sizes: the received buffer is the result
        return out.view(x.dtype).view(shape), rows
    per_rank = out.view(world, bound)  # (W, bound)
    return torch.cat([per_rank[r, : nbytes[r]] for r in range(world)]).view(x.dtype).view(shape), rows


class _Gather(torch.autograd.Function):
    """All-gather along dim 0 with per-rank sizes; backward = reduce-scatter (SUM), on gloo as an
    all-to-all plus a local sum."""

    @staticmethod
    def forward(
        ctx, tensor: torch.Tensor, group: Any, op: str, slot: int, structure: int
    ) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        out, sizes = _all_gather_rows(tensor, group, op, slot, structure)
        ctx.sizes, ctx.group, ctx.rank, ctx.op = sizes, group, dist.get_rank(group), op
        sizes_t = torch.tensor(sizes)
        ctx.mark_non_differentiable(sizes_t)
        return out, sizes_t

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _: Any):  # type: ignore[override]
        sizes, world, rows, mine = ctx.sizes, len(ctx.sizes), max(ctx.sizes), ctx.sizes[ctx.rank]
        rest = grad.shape[1:]
        if rows == 0:
            return grad.new_empty((0, *rest)), None, None, None, None
        if dist.get_backend(ctx.group) == dist.Backend.GLOO and grad.device.type == "cpu":
            # gloo's reduce-scatter takes 1.3-2.5x the time of an all-to-all plus a local sum
            # (benchmarks/bench_gather.py), and the all-to-all takes uneven sizes without padding
            parts = grad.new_empty((world * mine, *rest))  # (W*n, ...): every rank's gradient for my rows
            work = _all_to_all_single(
                parts, grad.contiguous(), [mine] * world, sizes, group=ctx.group, async_op=True
            )
            _wait(f"{ctx.op} (backward)", work, ctx.group)
            return parts.view(world, mine, *rest).sum(0), None, None, None, None  # (n, ...)
        # NCCL: a native reduce-scatter, on rows padded to the largest rank's
        if all(s == rows for s in sizes):
            padded = grad.contiguous()
        else:
            padded = grad.new_zeros((world, rows, *rest))  # (W, max_n, ...)
            for r, chunk in enumerate(torch.split(grad, sizes)):
                padded[r, : sizes[r]] = chunk
            padded = padded.view(world * rows, *rest)
        summed = grad.new_empty((rows, *rest))  # (max_n, ...): sum over ranks of my rows
        work = _reduce_scatter_single(summed, padded, op=dist.ReduceOp.SUM, group=ctx.group, async_op=True)
        _wait(f"{ctx.op} (backward)", work, ctx.group)
        return summed[:mine], None, None, None, None


def _gather_tensor(
    tensor: torch.Tensor, group: Any, op: str = "gather", slot: int = 0, structure: int = 0
) -> tuple[torch.Tensor, tuple[int, ...]]:
    if tensor.dim() == 0:
        tensor = tensor.unsqueeze(0)  # a scalar per rank gathers to a (W,) vector
    _check_device(tensor, group)
    gathered, sizes = _Gather.apply(tensor, group, op, slot, structure)
    return gathered, (0, *sizes.cumsum(0).tolist())


def gather(data: Any, *, return_offsets: bool = False, group: dist.ProcessGroup | None = None) -> Any:
    """Differentiable all-gather along dim 0, any number of rows per rank (0 included).

    Args:
        data: a tensor, or nested dicts/lists/tuples of tensors. Tensors must agree on
            every dim but dim 0, and on dtype, across ranks. 0-d tensors count as one row.
        return_offsets: also return, per tensor, ``offsets`` of length world_size + 1:
            rank ``r``'s rows are ``gathered[offsets[r]:offsets[r + 1]]``.
        group: process group; the default group when ``None``.

    Returns:
        The gathered data in rank order (same structure as ``data``), or
        ``(gathered, offsets)`` with ``return_offsets=True``. With one process (or no
        process group) the input itself is returned and offsets are ``(0, n)``.

    Gradients follow the rule in this module's docstring: the backward pass sums the
    gradients all ranks send to a row, so DDP's averaging yields the single-process
    gradient. Costs one all-gather forward (the sizes, shapes and dtypes travel with
    the data) and one reduce-scatter backward (on gloo an all-to-all and a local sum).
    The data are sent padded to the largest rank's size in the previous call at the
    same place: a first call, or one whose data outgrow that, pays a second all-gather.
    """
    if not is_distributed(group):
        if not return_offsets:
            _map(lambda t: t, data)  # type check only
            return data
        return data, _map(lambda t: (0, t.shape[0] if t.dim() else 1), data)
    if is_debug_mode():
        _debug_check("gather", data, group, same_shape=False)
    # every leaf's metadata carries the structure's checksum: ranks whose structures differ all
    # fail at the FIRST leaf, before a second collective could pair other tensors (or hang)
    structure, leaf = _structure_checksum(data), count()  # each leaf's bound is remembered apart
    try:
        pairs = _map(lambda t: _gather_tensor(t, group, slot=next(leaf), structure=structure), data)
    except _StructureMismatch:
        descs = _gather_objects("gather", _describe(data), group)  # every rank is here: it can meet
        lines = "\n".join(f"  rank {r}: {d}" for r, d in enumerate(descs))
        raise DistributedOperationError(
            "gather: every rank must pass the same structure (dict keys, number and order of tensors, "
            f"trailing shapes, dtypes); got\n{lines}"
        ) from None
    gathered = _map_pairs(pairs, 0)
    return (gathered, _map_pairs(pairs, 1)) if return_offsets else gathered


def _map_pairs(data: Any, index: int) -> Any:
    """Pick element ``index`` of the (tensor, offsets) pairs produced by ``_map``."""
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return data[index]
    if isinstance(data, Mapping):
        return type(data)({k: _map_pairs(v, index) for k, v in data.items()})
    if isinstance(data, tuple) and hasattr(data, "_fields"):
        return type(data)(*(_map_pairs(v, index) for v in data))
    return type(data)(_map_pairs(v, index) for v in data)


def local_slice(offsets: Sequence[int], rank: int | None = None) -> slice:
    """The rows of ``rank`` (this process by default) inside a gathered tensor."""
    if len(offsets) < 2:
        raise ValueError(
            f"offsets must be the world_size + 1 bounds from gather(..., return_offsets=True), got {list(offsets)}"
        )
    rank = get_rank() if rank is None else rank
    if not 0 <= rank < len(offsets) - 1:
        raise ValueError(f"rank must be in [0, {len(offsets) - 1}), got {rank}")
    return slice(offsets[rank], offsets[rank + 1])


# ----------------------------------------------------------------------------- reduce


def _check_same_structure(op: str, data: Any, group: dist.ProcessGroup | None) -> None:
    """One 2-element all-reduce: the max and min over ranks of a checksum of the structure,
    shapes and dtypes. Unequal checksums would pair different tensors (or hang on a
    different number of them), so every rank raises, with every rank's description."""
    desc = _describe(_map(lambda t: t, data))  # type-checks the leaves too
    crc = zlib.crc32(repr(_sorted(desc)).encode())
    device = _object_device(group)
    both = torch.tensor([crc, -crc], dtype=torch.int64, device=device)
    _wait(
        f"{op} (structure check)",
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group, async_op=True),
        group,
    )
    if both[0].item() != -both[1].item():
        descs = _gather_objects(op, desc, group)
        lines = "\n".join(f"  rank {r}: {d}" for r, d in enumerate(descs))
        raise DistributedOperationError(
            f"{op}: every rank must pass the same structure and shapes; got\n{lines}"
        )


def _sorted(desc: Any) -> Any:
    """A description whose dict entries come in sorted key order (``reduce`` pairs them by key)."""
    if isinstance(desc, dict):
        return [(repr(k), _sorted(desc[k])) for k in sorted(desc, key=repr)]
    if isinstance(desc, list):
        return [_sorted(v) for v in desc]
    return desc


def reduce(data: Any, op: str = "sum", *, group: dist.ProcessGroup | None = None) -> Any:
    """Non-differentiable all-reduce of same-shaped tensors (``op`` in sum/mean/max/min).

    Returns new tensors; the inputs are left untouched.
    """
    ops = {
        "sum": dist.ReduceOp.SUM,
        "mean": dist.ReduceOp.SUM,
        "max": dist.ReduceOp.MAX,
        "min": dist.ReduceOp.MIN,
    }
    if op not in ops:
        raise ValueError(f"op must be one of {sorted(ops)}, got {op!r}")
    if not is_distributed(group):
        return _map(lambda t: t.detach().clone(), data)
    if is_debug_mode():
        _debug_check("reduce", data, group, same_shape=True)
    else:
        _check_same_structure(f"reduce({op!r})", data, group)
    world = dist.get_world_size(group)

    def _one(t: torch.Tensor) -> torch.Tensor:
        out = t.detach().clone()
        _wait(f"reduce({op!r})", dist.all_reduce(out, op=ops[op], group=group, async_op=True), group)
        return out / world if op == "mean" else out

    return _map(_one, data)


# ----------------------------------------------------------------------------- objects


def _object_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where byte tensors travel: NCCL moves CUDA tensors only (as torch's object collectives)."""
    if dist.get_backend(group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_objects(op: str, obj: Any, group: dist.ProcessGroup | None) -> list[Any]:
    """Pickle, gather the bytes with the bounded tensor collectives, unpickle per rank.

    torch's ``all_gather_object`` waits for the process group's timeout (30 min on gloo);
    this one fails after ``SHARED_DIST_TIMEOUT`` like every other operation here."""
    payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(_object_device(group))
    gathered, offsets = _gather_tensor(payload, group, op, slot=-1)  # the bounded collectives of gather
    data = gathered.cpu().numpy().tobytes()
    return [pickle.loads(data[offsets[r] : offsets[r + 1]]) for r in range(len(offsets) - 1)]


def gather_object(obj: Any, *, group: dist.ProcessGroup | None = None) -> list[Any]:
    """Every rank's ``obj`` (ids, strings, small metadata) as a list in rank order.

    Objects travel pickled between the processes of one job; never feed this
    untrusted data.
    """
    if not is_distributed(group):
        return [obj]
    if is_debug_mode():
        _debug_check("gather_object", torch.empty(0), group, same_shape=True)
    return _gather_objects("gather_object", obj, group)


def broadcast_object(obj: Any, src: int = 0, *, group: dist.ProcessGroup | None = None) -> Any:
    """``obj`` of rank ``src``, on every rank."""
    if not 0 <= src < get_world_size(group):  # checked before any collective: a bad src would hang
        raise ValueError(f"src must be a rank in [0, {get_world_size(group)}), got {src}")
    if not is_distributed(group):
        return obj
    device = _object_device(group)
    is_src = dist.get_rank(group) == src
    payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8) if is_src else None
    size = torch.tensor([payload.numel() if is_src else 0], dtype=torch.int64, device=device)
    global_src = dist.get_global_rank(group, src) if group is not None else src
    _wait("broadcast_object (size)", dist.broadcast(size, global_src, group=group, async_op=True), group)
    data = payload.to(device) if is_src else torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    _wait("broadcast_object", dist.broadcast(data, global_src, group=group, async_op=True), group)
    return obj if is_src else pickle.loads(data.cpu().numpy().tobytes())


def check_same(value: Any, name: str = "value", *, group: dist.ProcessGroup | None = None) -> None:
    """Raise ``DistributedOperationError`` naming every rank's ``value`` unless all are equal.

    Use it to keep ranks in step (same step counter, same config, same number of
    negatives) before a sequence of collectives that would otherwise hang or mix data.
    """
    values = gather_object(value, group=group)
    if any(v != values[0] for v in values):
        lines = "\n".join(f"  rank {r}: {v!r}" for r, v in enumerate(values))
        raise DistributedOperationError(f"{name} differs across ranks:\n{lines}")


_LOCAL_COUNTERS: dict[str, int] = {}


def next_index(key: str) -> int:
    """The next number of the counter ``key``, shared by every rank: 0, 1, 2, … in the order the
    calls arrive, each number handed out exactly once.

    A work queue without a collective: ranks call it as often as they like, so a rank that
    finished its item takes the next one instead of waiting behind another rank's slow item
    (``rrcm_diffusers.certify_dataset`` hands out images with it). It uses the key-value store
    of the default process group (the rendezvous store of ``init_process_group``); in one process, a
    local counter. Use a new ``key`` for each queue (broadcast one from rank 0). The store is served from
    rank 0's process: end the queue with a collective (a ``barrier``, or a gather of the results, as
    ``certify_dataset`` does each round), so that rank 0 cannot exit while another rank still draws.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"key must be a non-empty string, got {key!r}")
    if not is_distributed():
        value = _LOCAL_COUNTERS[key] = _LOCAL_COUNTERS.get(key, -1) + 1
        return value
    store = dist.distributed_c10d._get_default_store()  # torch's own handle on the rendezvous store
    try:
        return int(store.add(f"shared_dist/next_index/{key}", 1)) - 1
    except RuntimeError as err:  # the store's host (rank 0's machine) is gone
        raise DistributedOperationError(f"next_index({key!r}) failed on rank {get_rank()}: {err}") from err


def barrier(*, group: dist.ProcessGroup | None = None) -> None:
    """Wait for every rank (a no-op in one process)."""
    if is_distributed(group):
        _wait("barrier", dist.barrier(group=group, async_op=True), group)
