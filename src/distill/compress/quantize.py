"""Post-training quantization of a causal LM's Linear layers: the grids, the runtime modules and
the fake quantization that quantization-aware distillation trains through.

Two weight grids, both written by hand and tested against float64 references:

- **int8 rows** (:func:`quantize_rows`): symmetric per output row, ``q = round(w / s)`` with
  ``s = max|w_row| / 127``, ``q`` in [-127, 127];
- **int4 groups** (:func:`quantize_groups`): asymmetric per group of ``g`` consecutive input
  weights of a row, ``w ~= q * s + m`` with ``s = (max - min) / 15`` over the range widened to
  hold 0 and ``m`` a whole number of steps below 0 (0 is on the grid), ``q`` in [0, 15];
  ``s`` and ``m`` are rounded to float16 first (they are stored as float16), so the stored grid
  and the fake-quantized one are the same. Two ``q`` share a byte on disk.

Runtime modules (``install_quantized_linears``):

- ``int8``: :class:`DynamicInt8Linear`, PyTorch's dynamic int8 kernel (``torch.ao``,
  fbgemm: int8 weights, activations quantized on the fly) made per token and outlier-aware.
  With several tokens, each input row is divided by its own max before the kernel (two constant
  rows, +1 and -1, pin the kernel's range to [-1, 1]) and its output multiplied back, so one
  token with massive activations (SmolLM2's first positions reach 1000x the median) no longer
  sets the step for the others, and a row's output does not depend on the other rows; a single
  token (decoding) goes to the kernel as it is, whose range is then its own. The few input channels with the largest calibration activations (``outlier_index``)
  bypass the kernel: their weight columns stay float and multiply those channels exactly (the
  mixed-precision decomposition of LLM.int8(), Dettmers et al. 2022, with the channels fixed by
  calibration). SmoothQuant migration (:class:`SmoothedLinear`) and keeping whole layers in
  float remain available (see :mod:`distill.compress.calibrate`).
- ``int8-weight-only`` and ``int4``: :class:`WeightOnlyLinear`, float activations, integer
  weights. On CPU in float32 a decoder-sized weight runs on torchao's weight-only tensors (the
  ``quantize`` extra; :mod:`distill.compress.torchao_weights`), built from the grids here: torchao
  de-quantizes the weight on each call and uses the float matmul, faster at batch 1 than
  PyTorch's packed CPU kernels ``torch._weight_int8pack_mm`` and
  ``torch._weight_int4pack_mm_for_cpu`` in the decoder's shapes (2x int8, 1.4x int4); those run
  a vocabulary-sized head (there they are 2.5x faster) and everything when torchao is absent;
  elsewhere the layer de-quantizes + matmuls.
  Every weight-only layer is still slower than the float layer at batch 1 on CPU
  (``benchmarks/weight_only_kernels.py``): these grids save memory and disk, not time.
  torchao's ``Int4WeightOnlyConfig`` needs the ``mslk`` package. The grids are stored in
  safetensors and load without torchao.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from distill.compress.torchao_weights import TORCHAO_MAX_WEIGHTS, torchao_weight

__all__ = [
    "QUANTIZE_METHODS",
    "GROUP_SIZES",
    "quantize_rows",
    "dequantize_rows",
    "split_outliers",
    "quantize_groups",
    "dequantize_groups",
    "pack_int4",
    "unpack_int4",
    "fake_quantize_rows",
    "fake_quantize_groups",
    "FakeQuantize",
    "WeightOnlyLinear",
    "weight_only_paths",
    "SmoothedLinear",
    "DynamicInt8Linear",
    "linear_names",
    "install_quantized_linears",
]

QUANTIZE_METHODS = ("int8", "int8-weight-only", "int4")
GROUP_SIZES = (32, 64, 128)


# --- int8 rows --------------------------------------------------------------------------------


def _row_scale(w: torch.Tensor) -> torch.Tensor:
    scale = w.abs().amax(dim=1) / 127.0  # (out,)
    return torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero rows stay zero


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: int8 ``[out, in]`` and float32 ``[out]`` with ``weight ~= q * scale[:, None]``."""
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    scale = _row_scale(w)
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float32 ``[out, in]`` from :func:`quantize_rows`' output."""
    return q.float() * scale[:, None].float()


def split_outliers(
    weight: torch.Tensor, outlier_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, scale, outlier_weight)`` of ``weight`` ``[out, in]``: int8 rows of the weight without
    the ``outlier_index`` columns (zeros there, so they do not widen the row's step) and those
    columns ``[out, k]`` rounded to float16, as they are stored."""
    weight = weight.detach().float()
    columns = weight[:, outlier_index].half()  # (out, k)
    q, scale = quantize_rows(weight.index_fill(1, outlier_index, 0.0))
    return q, scale, columns


# --- int4 groups ------------------------------------------------------------------------------


def _check_groups(weight: torch.Tensor, group_size: int) -> None:
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if group_size < 1 or weight.shape[1] % group_size:
        raise ValueError(
            f"group size {group_size} does not divide the input width {weight.shape[1]}"
        )


def _group_params(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float16-rounded ``(scale, minimum)`` ``[out, in/g]`` of float ``w`` ``[out, in]``.

    The grid spans the group's range widened to hold 0, and its minimum is a whole number of
    steps below 0, so 0 is a grid point (up to the float16 rounding of the minimum). A
    min-to-max grid moves zero weights by up to half a step, which a trained student does not
    survive at group 32 (``benchmarks/gguf_round_trip.py`` measures both grids).
    """
    groups = w.reshape(w.shape[0], -1, group_size)  # (out, in/g, g)
    low = groups.amin(dim=-1).clamp(max=0.0)
    high = groups.amax(dim=-1).clamp(min=0.0)
    scale = ((high - low) / 15.0).half().float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero groups: q = 0
    zero_code = torch.clamp(torch.round(-low / scale), 0, 15)  # the code that stands for 0
    return scale, (-zero_code * scale).half().float()


def _group_codes(
    w: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Unclamped-then-clamped codes ``[out, in/g, g]`` in [0, 15] (float)."""
    groups = w.reshape(w.shape[0], -1, group_size)
    return torch.clamp(torch.round((groups - low[..., None]) / scale[..., None]), 0, 15)


def quantize_groups(
    weight: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, scale, minimum)``: uint8 codes ``[out, in]`` in [0, 15] and float16 ``[out, in/g]``
    with ``weight ~= q * scale + minimum`` group by group."""
    _check_groups(weight, group_size)
    w = weight.detach().float()
    scale, low = _group_params(w, group_size)
    q = _group_codes(w, scale, low, group_size).reshape(w.shape).to(torch.uint8)
    return q, scale.half(), low.half()


def dequantize_groups(
    q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Float32 ``[out, in]`` from :func:`quantize_groups`' output."""
    groups = q.float().reshape(q.shape[0], -1, group_size)
    return (groups * scale.float()[..., None] + low.float()[..., None]).reshape(q.shape)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes ``[out, in]`` in [0, 15] (``in`` even) -> bytes ``[out, in/2]``: low nibble first."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``[out, in/2]`` bytes -> uint8 codes ``[out, in]``."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)


# --- fake quantization (straight-through) ----------------------------------------------------


def _straight_through(w: torch.Tensor, low: torch.Tensor, high: torch.Tensor, grid) -> torch.Tensor:
    """``grid(clamp(w))`` in the forward; gradient 1 where ``low <= w <= high``, else 0."""
    clipped = torch.clamp(w, low, high)  # gradient 1 on the closed range, bounds included
    return clipped + (grid(clipped.detach()) - clipped).detach()


def fake_quantize_rows(weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """The int8-row grid in the forward, the straight-through gradient in the backward.

    ``scale`` ``[out]`` defaults to the weight's own (recomputed from it, not trained)."""
    scale = _row_scale(weight.detach().float()) if scale is None else scale
    bound = (127.0 * scale)[:, None]

    def grid(w: torch.Tensor) -> torch.Tensor:
        return torch.round(w / scale[:, None]) * scale[:, None]

    return _straight_through(weight, -bound, bound, grid)


def fake_quantize_groups(
    weight: torch.Tensor,
    group_size: int,
    scale: torch.Tensor | None = None,
    low: torch.Tensor | None = None,
) -> torch.Tensor:
    """The int4-group grid in the forward, the straight-through gradient in the backward.

    ``scale`` / ``low`` ``[out, in/g]`` default to the weight's own (float16-rounded, as stored).
    """
    _check_groups(weight, group_size)
    if scale is None or low is None:
        scale, low = _group_params(weight.detach().float(), group_size)
    shape = weight.shape
    # a weight within half a step of the grid's ends is rounded, not clipped: its gradient passes
    lo = (low - 0.5 * scale).repeat_interleave(group_size, dim=1)  # (out, in)
    hi = (low + 15.5 * scale).repeat_interleave(group_size, dim=1)

    def grid(w: torch.Tensor) -> torch.Tensor:
        codes = _group_codes(w, scale, low, group_size)
        return (codes * scale[..., None] + low[..., None]).reshape(shape)

    return _straight_through(weight, lo, hi, grid)


class FakeQuantize(nn.Module):
    """A parametrization (``torch.nn.utils.parametrize``) that fake-quantizes a weight on every
    forward, scales recomputed from the current weight: ``bits`` 8 (rows) or 4 (groups).

    ``smooth`` ``[in]`` (smoothed dynamic int8): the grid is that of ``W * smooth``, as stored.
    ``outlier_index`` ``[k]`` (dynamic int8): those columns are float16 (straight through) and
    the other columns' rows are quantized without them, as :func:`split_outliers` stores them.
    """

    def __init__(
        self,
        bits: int,
        group_size: int = 64,
        smooth: torch.Tensor | None = None,
        outlier_index: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        self.bits, self.group_size = bits, group_size
        self.register_buffer("smooth", None if smooth is None else smooth.float().clone())
        index = None if outlier_index is None or not len(outlier_index) else outlier_index.long()
        self.register_buffer("outlier_index", index)
        self._outlier_mask: torch.Tensor | None = None  # (1, in) bool, from outlier_index

    def _rows(self, w: torch.Tensor) -> torch.Tensor:
        if self.outlier_index is None:
            return fake_quantize_rows(w)
        outlier = self._outlier_mask
        if outlier is None or outlier.shape[1] != w.shape[1] or outlier.device != w.device:
            outlier = torch.zeros(1, w.shape[1], dtype=torch.bool, device=w.device)
            outlier[0, self.outlier_index] = True
            self._outlier_mask = outlier  # made once, not on every training step
        rows = fake_quantize_rows(w.masked_fill(outlier, 0.0))
        columns = w + (w.detach().half().float() - w.detach())  # float16, gradient 1
        return torch.where(outlier, columns, rows)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.bits == 4:
            return fake_quantize_groups(weight, self.group_size)
        if self.smooth is None:
            return self._rows(weight)
        return self._rows(weight * self.smooth) / self.smooth


# --- runtime modules -------------------------------------------------------------------------


class WeightOnlyLinear(nn.Module):
    """A Linear with integer weights and float activations (int8 rows or int4 groups).

    On CPU in float32 it runs on torchao's weight-only tensors when torchao is installed and the
    weight has at most ``TORCHAO_MAX_WEIGHTS`` entries (:mod:`distill.compress.torchao_weights`),
    else on PyTorch's packed CPU kernels; ``path`` says which, chosen once and checked against
    the de-quantized reference. Elsewhere (or when neither agrees) it de-quantizes on each call
    (slow, exact). ``path`` given forces one (benchmarks and tests compare them).
    """

    def __init__(
        self,
        q: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        low: torch.Tensor | None = None,
        group_size: int = 0,
        path: str | None = None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.bits = 4 if low is not None else 8
        self.group_size = group_size
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        if self.bits == 8:
            self.register_buffer("weight_int8", q.to(torch.int8).contiguous())
            self.register_buffer("scale", scale.float().contiguous())
        else:
            # codes 0..15 held as int8: torchao's tensor reads these very bytes
            self.register_buffer("codes", q.to(torch.int8).contiguous())
            self.register_buffer("scale", scale.float().contiguous())  # (out, in/g)
            self.register_buffer("low", low.float().contiguous())  # (out, in/g)
        if path not in (None, "torchao", "kernel", "dequantize"):
            raise ValueError(f"unknown weight-only path {path!r}")
        self.forced_path = path
        self._set_up_path()
        # torchao's zero points and the packed kernel's weight derive from the buffers: build
        # them again when a state dict replaces those
        self.register_load_state_dict_post_hook(lambda module, _keys: module._set_up_path())

    def _set_up_path(self) -> None:
        """Choose (or set up the forced) path and build what it derives from the buffers."""
        self._drop_derived()
        path = self.forced_path
        if path is None:
            self.path = self._choose_path()
        elif path == "dequantize" or self._try_path(path):
            self.path = path
        else:
            raise ValueError(f"weight-only path {path!r} does not run here")

    def _drop_derived(self) -> None:
        for derived in ("torchao_weight", "packed", "scales_zeros"):
            if hasattr(self, derived):
                delattr(self, derived)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight ``[out, in]`` this layer computes with."""
        if self.bits == 8:
            return dequantize_rows(self.weight_int8, self.scale)
        return dequantize_groups(self.codes, self.scale, self.low, self.group_size)

    def _choose_path(self) -> str:
        """``"torchao"``, ``"kernel"`` or ``"dequantize"``: the first that runs here and agrees
        with the de-quantized weight (torchao only up to ``TORCHAO_MAX_WEIGHTS`` weights)."""
        small = self.out_features * self.in_features <= TORCHAO_MAX_WEIGHTS
        if small and self._try_path("torchao"):
            return "torchao"
        return "kernel" if self._try_path("kernel") else "dequantize"

    def _try_path(self, path: str) -> bool:
        """Build ``path``'s derived weight; keep it only if it runs and agrees with the
        de-quantized weight (a torchao of another version may not build its tensors: no torchao
        then)."""
        try:
            if path == "torchao":
                codes = self.weight_int8 if self.bits == 8 else self.codes
                low = None if self.bits == 8 else self.low
                weight = torchao_weight(codes, self.scale, low, self.group_size)
                if weight is None:
                    return False
                self.torchao_weight = weight  # shares the codes' memory; not in the state dict
            elif self.bits == 4:
                # torch's int4 kernel: w = (q - 8) * scale + zero, so zero = minimum + 8 * scale
                scales_zeros = torch.stack([self.scale, self.low + 8 * self.scale], dim=-1)
                self.register_buffer(
                    "scales_zeros", scales_zeros.transpose(0, 1).contiguous(), persistent=False
                )  # (in/g, out, 2)
                packed = torch._convert_weight_to_int4pack_for_cpu(self.codes.to(torch.int32), 1)
                self.register_buffer("packed", packed, persistent=False)
            probe = torch.linspace(-1, 1, 2 * self.in_features).reshape(2, -1)
            got = self._fast_matmul(probe, path)
        except (RuntimeError, AttributeError, NotImplementedError, AssertionError, TypeError):
            self._drop_derived()
            return False
        want = probe @ self.dequantized().T
        agrees = torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()) + 1e-6)
        if not agrees:
            self._drop_derived()
        return agrees

    def _fast_matmul(self, x: torch.Tensor, path: str) -> torch.Tensor:
        if path == "torchao":
            return nn.functional.linear(x, self.torchao_weight)
        if self.bits == 8:
            return torch._weight_int8pack_mm(x, self.weight_int8, self.scale)
        return torch._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.in_features)  # (tokens, in)
        if self.path != "dequantize" and flat.device.type == "cpu" and flat.dtype == torch.float32:
            out = self._fast_matmul(flat.contiguous(), self.path)
        else:
            out = flat @ self.dequantized().to(flat.dtype).T
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)


def weight_only_paths(model: nn.Module) -> dict[str, int]:
    """How many of ``model``'s :class:`WeightOnlyLinear` layers run on each path."""
    paths: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, WeightOnlyLinear):
            paths[module.path] = paths.get(module.path, 0) + 1
    return paths


class DynamicInt8Linear(nn.Module):
    """Per-token dynamic int8 Linear with float outlier channels (see the module docstring).

    ``q`` int8 ``[out, in]`` and ``scale`` ``[out]`` hold the weight without its outlier columns
    (zeros there); ``outlier_weight`` ``[out, k]`` holds those columns in float for the input
    channels ``outlier_index`` ``[k]`` (kept transposed, as ``outlier_rows``).
    """

    def __init__(
        self,
        q: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        outlier_index: torch.Tensor | None = None,
        outlier_weight: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        index = torch.zeros(0, dtype=torch.long) if outlier_index is None else outlier_index
        self.register_buffer("outlier_index", index.long().contiguous())
        columns = torch.zeros(self.out_features, 0) if outlier_weight is None else outlier_weight
        # stored transposed: a row per outlier channel, so the small product per token reads
        # the columns in memory order rather than through a transposed view
        self.register_buffer("outlier_rows", columns.float().T.contiguous())  # (k, out)
        keep = torch.ones(self.in_features)
        keep[self.outlier_index] = 0.0
        self.register_buffer("keep", keep, persistent=False)  # (in,): 0 on outlier channels
        q = q.clone()
        q[:, self.outlier_index] = 0  # those channels go through the float columns
        self.kernel = _dynamic_linear(q, scale)
        # two extra rows (tokens) of +1 and -1 pin the kernel's per-tensor range to [-1, 1]
        self.register_buffer("bounds", torch.tensor([[1.0], [-1.0]]), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.in_features).float()  # (tokens, in)
        outliers = None
        if self.outlier_index.numel():
            outliers = flat.index_select(1, self.outlier_index)  # (tokens, k)
            flat = flat * self.keep  # outliers must not set the activation range
        if len(flat) == 1:  # one token (decoding): the kernel's own range is already per token
            out = self.kernel(flat)
        else:
            tokens = len(flat)
            row_max = flat.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)  # (tokens, 1)
            scaled = torch.cat([flat / row_max, self.bounds.expand(2, self.in_features)])
            out = self.kernel(scaled)[:tokens] * row_max  # (tokens, out)
        if outliers is not None:
            out = torch.addmm(out, outliers, self.outlier_rows)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)


class SmoothedLinear(nn.Module):
    """SmoothQuant's scale migration around a quantized Linear: ``layer(x / smooth)`` where the
    layer's weight is ``W * smooth`` (per input channel), so activation outliers shrink before
    the per-tensor activation quantization and move into the per-row-quantized weight."""

    def __init__(self, layer: nn.Module, smooth: torch.Tensor) -> None:
        super().__init__()
        self.layer = layer
        self.register_buffer("inverse", (1.0 / smooth.float()).contiguous())  # (in,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x * self.inverse)


def linear_names(model: nn.Module) -> list[str]:
    """Qualified names of every ``nn.Linear`` (decoder projections and the output head)."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _dynamic_linear(q: torch.Tensor, scale: torch.Tensor) -> nn.Module:
    """A bias-free ``DynamicQuantizedLinear`` holding exactly ``q`` and ``scale``."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    out_features, in_features = q.shape
    with warnings.catch_warnings():  # torch marks quantized tensors deprecated (2.13)
        warnings.simplefilter("ignore", UserWarning)
        module = DynamicLinear(in_features, out_features, bias_=False)
        qweight = torch._make_per_channel_quantized_tensor(
            q, scale.double(), torch.zeros(out_features, dtype=torch.long), 0
        )
        module.set_weight_bias(qweight, None)
    return module


def install_quantized_linears(
    model: nn.Module, quantized: dict[str, dict[str, torch.Tensor]], method: str
) -> nn.Module:
    """Swap the Linear layers named in ``quantized`` for their quantized runtime modules.

    Each entry holds ``q`` and ``scale`` (plus ``low`` and ``group_size`` for int4 groups;
    ``smooth``, ``outlier_index`` and ``outlier_weight`` for a dynamic int8 layer); see the module
    docstring for ``method``.
    """
    if method not in QUANTIZE_METHODS:
        raise ValueError(f"method must be one of {QUANTIZE_METHODS}, got {method!r}")
    for name, parts in quantized.items():
        linear = model.get_submodule(name)
        bias = None if linear.bias is None else linear.bias.detach()
        if method == "int8":
            module: nn.Module = DynamicInt8Linear(
                parts["q"],
                parts["scale"],
                bias,
                outlier_index=parts.get("outlier_index"),
                outlier_weight=parts.get("outlier_weight"),
            )
            if "smooth" in parts:
                module = SmoothedLinear(module, parts["smooth"])
        elif "low" in parts:
            module = WeightOnlyLinear(
                parts["q"],
                parts["scale"],
                bias,
                low=parts["low"],
                group_size=int(parts["group_size"]),
            )
        else:
            module = WeightOnlyLinear(parts["q"], parts["scale"], bias)
        _set_module(model, name, module)
    return model
