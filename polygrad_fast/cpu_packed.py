"""oneDNN-prepacked bf16 / fp32 Linear execution on CPU, with weight refresh and no recompile.

``prepack_linears(module)`` swaps every large bf16 or fp32 ``nn.Linear`` of an inference copy for a ``PackedLinear``
that shares its parameters (names and state dict unchanged) and runs ``mkldnn._linear_pointwise`` on a weight
reordered once into oneDNN's blocked layout. Measured on a 2-core Sapphire Rapids (AMX-bf16), B=256: 1024x1024
Linear 216 vs 304 µs with plain bf16 F.linear; same bits (both are the same oneDNN bf16 GEMM, fp32 accumulation).
fp32 weights run oneDNN's fp32 GEMM (any x86 CPU: brgemm on AVX2 and up) instead of MKL's, bias and residual in
the epilogue, so the output is not first filled with the broadcast bias and the skip connection is not a second
pass; it differs from F.linear by fp32 reduction order only.

The GEMM is the opaque custom op ``polygrad_fast::packed_linear(x, bias, slot, out_features)``: the packed
weight lives in a Python registry under an int key held in the 0-dim int64 buffer ``slot`` (non-persistent, so
not in the state dict), so ``torch.compile`` fuses the LayerNorm/ReLU/residual work around the GEMMs without
baking weights into the graph (inductor freezing would, and recompiles ~4 s on every weight change). The key is
a tensor, not a Python int, because dynamo bakes int attributes into the graph: every new copy of a packed module
would then compile its own graph and a few samplers in one process would hit dynamo's recompile limit.
``refresh(module)`` repacks (~0.5 ms per 1024x1024 weight) the Linears whose weight changed, and the compiled graph
keeps running unchanged.

Whether packing pays off is measured on the running CPU (``packing_pays_off``: packed vs plain GEMM at the batch
hint, once per weight shape and process), so ``prepack_linears`` swaps only the Linears that measured faster;
``POLYGRAD_FAST_CPU_PREPACK`` = always / never / measure (default) overrides that.
"""
from __future__ import annotations

import copy
import functools
import itertools
import os
import typing
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .backend import choose_fastest, interleaved_min_times, linear_call

_PACKED: dict[int, torch.Tensor] = {}  # slot -> packed weight (opaque mkldnn tensor)
_SLOTS = itertools.count()


PACKABLE_DTYPES = (torch.bfloat16, torch.float32)


def available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """True when this torch build has the oneDNN linear ops and this CPU runs them in ``dtype``: fp32 on any x86
    CPU; bf16 needs AVX512-BW/VL/DQ, AVX-NE-CONVERT or AMX (on an AVX2-only CPU the bf16 weight reorder raises)."""
    ops = torch.ops.mkldnn
    if dtype not in PACKABLE_DTYPES or not (torch.backends.mkldnn.is_available()
                                            and hasattr(ops, "_reorder_linear_weight")
                                            and hasattr(ops, "_linear_pointwise")):
        return False
    return dtype == torch.float32 or bool(ops._is_mkldnn_bf16_supported())


def _packed_linear(x: torch.Tensor, bias: torch.Tensor | None, slot: torch.Tensor, out_features: int,
                   residual: torch.Tensor | None = None) -> torch.Tensor:
    x2, w = x.reshape(-1, x.shape[-1]), _PACKED[int(slot)]
    if residual is None:
        y = torch.ops.mkldnn._linear_pointwise(x2, w, bias, "none", [], "")
    else:
        y = torch.ops.mkldnn._linear_pointwise.binary(x2, residual.reshape(-1, out_features), w, bias, "add")
    return y.view(*x.shape[:-1], out_features)


# Registered with torch.library.Library rather than the custom_op decorator: ~6 vs ~15 µs of dispatch per call
# (measured on a 1x1024 input), and a Hopper step makes 8 of these calls.
_LIB = torch.library.Library("polygrad_fast", "FRAGMENT")
_LIB.define("packed_linear(Tensor x, Tensor? bias, Tensor slot, int out_features, Tensor? residual=None) "
                   "-> Tensor")
_LIB.impl("packed_linear", _packed_linear, "CompositeExplicitAutograd")


@torch.library.register_fake("polygrad_fast::packed_linear")
def _(x, bias, slot, out_features, residual=None):
    return x.new_empty(*x.shape[:-1], out_features)


# packed_linear(x [..., in], bias, slot, out_features, residual=None) -> [..., out_features], all in W's dtype
# (bf16 or fp32) = x @ W.T + bias (+ residual [..., out_features], added in the GEMM's fp32 epilogue), W the weight
# packed under key ``slot`` (0-dim int64 CPU tensor). No autograd.
packed_linear = torch.ops.polygrad_fast.packed_linear


class PackedLinear(nn.Linear):
    """A bf16 / fp32 ``nn.Linear`` whose forward uses the packed copy of its weight (call ``repack`` after
    changes)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, batch_hint: int) -> "PackedLinear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias  # shared Parameters: names and state dict unchanged
        key = next(_SLOTS)
        new.register_buffer("slot", torch.tensor(key), persistent=False)
        new.batch_hint, new._packed_key = batch_hint, None
        weakref.finalize(new, _PACKED.pop, key, None)
        new.repack()
        return new

    def __deepcopy__(self, memo):  # a copy gets its own slot (the registry entry dies with its owner)
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight = copy.deepcopy(self.weight, memo)
        plain.bias = copy.deepcopy(self.bias, memo)
        return PackedLinear.from_linear(plain, self.batch_hint)

    def _key(self) -> tuple | None:
        w = self.weight  # the bias is passed to the op as is; only the weight is packed
        return None if w.is_inference() else (w.data_ptr(), w._version)  # inference tensors: no version

    def repack(self, force: bool = False) -> bool:
        """Reorder the weight into oneDNN's layout if it changed (data_ptr or version) since the last pack; True if
        it did. ~0.5 ms per 1024x1024 bf16 weight, as long as comparing with a snapshot would take, so the sampler's
        sync (which copies into the weights at every call) just repacks."""
        key = self._key()
        if not force and key is not None and key == self._packed_key:
            return False
        # pass W itself ([out, in]): the op packs W.T internally (passing W.T gives wrong results)
        _PACKED[int(self.slot)] = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), self.batch_hint)
        self._packed_key = key
        return True

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., in] -> [..., out] (+ residual [..., out]: a residual block's skip connection, fused into the GEMM
        on the packed path; Hopper B=256 1024x1024: 320-336 µs vs 385-408 µs as GEMM then add)."""
        rows, dtype = x.numel() // max(x.shape[-1], 1), self.weight.dtype
        if x.dtype != dtype or x.device.type != "cpu" or (
                dtype == torch.bfloat16 and PLAIN_ROWS[0] < rows < PLAIN_ROWS[1]) or (
                torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)) or (
                residual is not None and (residual.dtype != dtype or not residual.is_contiguous())):
            y = F.linear(x, self.weight, self.bias)  # no autograd through the packed op
            return y if residual is None else residual + y
        return packed_linear(x, self.bias, self.slot, self.out_features, residual)


# bf16 row counts strictly inside this band run plain F.linear (a static-shape branch, free under torch.compile):
# there oneDNN's packed bf16 GEMM (layout picked for batch_hint 256) was slower on Sapphire Rapids. fp32 has no band:
# on AVX2 Zen 3 (one run, loaded host) 1024x1024 + residual packed for 256 rows took 0.45-1.12x plain + add at 256 to
# 2048 rows, slower only at 768. bf16 on Sapphire Rapids, 1024x1024 GEMM (+ residual), µs, plain+add vs
# packed with the add in the epilogue, two runs agreeing to ~10%: 256 rows 407 vs 224, 512 751 vs 515, 640 853 vs
# 940, 768 994 vs 1369, 896 1104 vs 1536, 1024 2012 vs 1723, 1280 2404 vs 1078, 2048 2051 vs 1742, 3072 2915 vs
# 2666. Whole Hopper sample(), compiled, interleaved: B=1024 packed 2.25-2.30 vs 2.37-2.55 s plain; B=768 packed
# 1.86 vs 1.45 s (hence the band).
PLAIN_ROWS = (512, 1024)

PREPACK_ENV_VAR = "POLYGRAD_FAST_CPU_PREPACK"
PREPACK_MODES = ("measure", "always", "never")


def prepack_mode() -> str:
    """``POLYGRAD_FAST_CPU_PREPACK`` (one of ``PREPACK_MODES``; unset = 'measure'); ValueError on anything else."""
    mode = os.environ.get(PREPACK_ENV_VAR, "").strip().lower() or "measure"
    if mode not in PREPACK_MODES:
        raise ValueError(f"environment variable {PREPACK_ENV_VAR}={mode!r}: expected one of {PREPACK_MODES}")
    return mode


def packed_linear_call(rows: int, in_features: int, out_features: int, dtype: torch.dtype = torch.bfloat16,
                       residual: bool = False) -> typing.Callable[[], torch.Tensor]:
    """A call of one packed GEMM (+ bias) [rows, in] x [out, in]^T in ``dtype``, packed for ``rows`` (to time, in
    inference mode; the twin of ``backend.linear_call``, same inputs); ``residual``: + a [rows, out] skip
    connection in the epilogue, as ``PackedLinear.forward(x, residual)`` runs it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, in_features, generator=g).to(dtype)
    w = (torch.randn(out_features, in_features, generator=g) / in_features ** 0.5).to(dtype)
    b = torch.zeros(out_features, dtype=dtype)
    packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)
    if residual:
        skip = torch.randn(rows, out_features, generator=g).to(dtype)
        return lambda: torch.ops.mkldnn._linear_pointwise.binary(x, skip, packed, b, "add")
    return lambda: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")


@functools.lru_cache(maxsize=None)
def packing_pays_off(rows: int, in_features: int, out_features: int, dtype: torch.dtype = torch.bfloat16,
                     residual: bool = False) -> bool:
    """True when the packed GEMM at this shape and dtype measured faster than plain ``F.linear`` on this CPU
    (``backend.interleaved_min_times``, ``backend.choose_fastest`` with plain preferred: packed must be >
    ``backend.TIE_TOLERANCE`` faster). ``residual``: the Linear's output takes a skip connection, so both sides
    are timed with it (plain: F.linear then the add; packed: the add in the epilogue). Measured once per shape,
    dtype and process (a few ms); False without ``available(dtype)``."""
    if not available(dtype):
        return False
    with torch.inference_mode():
        timings = interleaved_min_times({"plain": linear_call(rows, in_features, out_features, dtype, residual),
                                         "packed": packed_linear_call(rows, in_features, out_features, dtype,
                                                                      residual)})
    return choose_fastest(timings, prefer="plain") == "packed"


def prepack_linears(module: nn.Module, batch_hint: int = 256, skip: tuple[nn.Module, ...] = ()) -> int:
    """In place: swap every bf16 / fp32 CPU ``nn.Linear`` for a ``PackedLinear`` where packing pays off at
    ``batch_hint`` rows (``prepack_mode()``: 'measure' asks ``packing_pays_off``, so small Linears too are packed
    only where the packed op's larger fixed cost per call measured outweighed (bf16 at B=256: 160x160 packed 42 vs
    plain 34 µs on Sapphire Rapids, 56 vs 93 µs on a Zen 4); 'always' packs every Linear that ``available(dtype)``,
    'never' none; a Linear named by its parent's ``PACKED_RESIDUAL``
    attribute is measured with the skip connection the parent passes it); returns how many. ``batch_hint``: the
    rows per call oneDNN picks the blocked layout for (any row count stays correct). Submodules in ``skip`` (and below them)
    are left as they are."""
    mode = prepack_mode()
    if mode == "never":
        return 0
    skipped = {id(m) for s in skip for m in s.modules()}
    n = 0
    for parent in [m for m in module.modules() if id(m) not in skipped]:
        for name, child in list(parent._modules.items()):
            if type(child) is not nn.Linear:
                continue
            w = child.weight
            if (available(w.dtype) and w.device.type == "cpu" and (
                    mode == "always" or packing_pays_off(batch_hint, child.in_features, child.out_features, w.dtype,
                                                         getattr(parent, "PACKED_RESIDUAL", None) == name))):
                parent._modules[name] = PackedLinear.from_linear(child, batch_hint)
                n += 1
    return n


def refresh(module: nn.Module) -> int:
    """Repack the ``PackedLinear``s of ``module`` whose weights changed; returns how many were repacked."""
    return sum(m.repack() for m in module.modules() if isinstance(m, PackedLinear))
