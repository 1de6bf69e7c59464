"""distill's weight-only layers against torchao's and PyTorch's kernels, one Linear at a time,
batch 1, CPU float32.

distill quantizes weights by hand (the grids of ``distill.compress.quantize``) and runs each
layer on the faster of two engines: torchao's weight-only tensors built from its grid (for
weights up to ``TORCHAO_MAX_WEIGHTS``) or PyTorch's packed CPU kernels
(``torch._weight_int8pack_mm``, ``torch._weight_int4pack_mm_for_cpu``). This measures that choice
in the default student's Linear shapes (SmolLM2's q/o 576x576, k/v 192x576, gate/up 1536x576,
down 576x1536, the 49152x576 head), each as

- ``float``: ``nn.Linear``, float32;
- ``kernel_int8`` / ``kernel_int4``: :class:`~distill.compress.quantize.WeightOnlyLinear`
  forced onto PyTorch's packed kernels (int8 rows; 4-bit groups of 64);
- ``torchao_int8`` / ``torchao_int4``: torchao's own ``Int8WeightOnlyConfig`` and
  ``IntxWeightOnlyConfig(int4, PerGroup(64), asymmetric)`` applied to the float layer (its
  ``Int4WeightOnlyConfig`` needs the ``mslk`` package);
- ``distill_int8`` / ``distill_int4``: ``WeightOnlyLinear`` as distill builds it (its own
  choice of engine, recorded as ``distill_paths``).

One input row (decoding at batch 1) through each layer ``--calls`` times is one timing; the
kinds take turns within a round, ``--rounds`` rounds, and each ratio is the median of the
per-round ratios (the machine's speed drifts between rounds). A decoder layer's time is the sum
of its seven Linears'. Each layer's output is also compared with the float layer's (relative
max difference), so a fast path that computes something else would show.

    python benchmarks/weight_only_kernels.py [--rounds 7] [--calls 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from common import paired_ratio, print_table, target, write_results  # noqa: E402
from torch import nn  # noqa: E402

from distill.compress.quantize import (  # noqa: E402
    WeightOnlyLinear,
    quantize_groups,
    quantize_rows,
)
from distill.compress.torchao_weights import TORCHAO_MAX_WEIGHTS  # noqa: E402

HIDDEN, FFN, KV, VOCAB = 576, 1536, 192, 49152
# (name, out_features, in_features, copies in one decoder layer; the head is not in a layer)
SHAPES = (
    ("q_o", HIDDEN, HIDDEN, 2),
    ("k_v", KV, HIDDEN, 2),
    ("gate_up", FFN, HIDDEN, 2),
    ("down", HIDDEN, FFN, 1),
    ("head", VOCAB, HIDDEN, 0),
)
KINDS = (
    "float",
    "kernel_int8",
    "torchao_int8",
    "distill_int8",
    "kernel_int4",
    "torchao_int4",
    "distill_int4",
)
GROUP = 64


def torchao_layer(linear: nn.Linear, bits: int) -> nn.Module:
    """A copy of ``linear`` quantized by torchao's weight-only config for ``bits``."""
    from torchao.quantization import (
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        MappingType,
        PerGroup,
        quantize_,
    )

    holder = nn.Sequential(nn.Linear(linear.in_features, linear.out_features, bias=False))
    holder[0].weight.data.copy_(linear.weight.data)
    if bits == 8:
        config = Int8WeightOnlyConfig()
    else:
        config = IntxWeightOnlyConfig(
            weight_dtype=torch.int4,
            granularity=PerGroup(GROUP),
            mapping_type=MappingType.ASYMMETRIC,
        )
    quantize_(holder, config)
    return holder[0]


def layers_of(out_features: int, in_features: int, seed: int) -> dict[str, nn.Module]:
    """The seven kinds of one Linear shape, all from the same random float weight."""
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=False)
    weight = torch.randn(out_features, in_features, generator=generator) * in_features**-0.5
    linear.weight.data.copy_(weight)
    q8, scale8 = quantize_rows(weight)
    q4, scale4, low4 = quantize_groups(weight, GROUP)
    return {
        "float": linear,
        "kernel_int8": WeightOnlyLinear(q8, scale8, path="kernel"),
        "torchao_int8": torchao_layer(linear, 8),
        "distill_int8": WeightOnlyLinear(q8, scale8),
        "kernel_int4": WeightOnlyLinear(q4, scale4, low=low4, group_size=GROUP, path="kernel"),
        "torchao_int4": torchao_layer(linear, 4),
        "distill_int4": WeightOnlyLinear(q4, scale4, low=low4, group_size=GROUP),
    }


def seconds_per_call(layer: nn.Module, row: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        layer(row)
    return (time.perf_counter() - start) / calls


def output_errors(layers: dict[str, nn.Module], in_features: int) -> dict[str, float]:
    """Each kind's max |output - float output| / max |float output| on 8 random rows."""
    rows = torch.randn(8, in_features, generator=torch.Generator().manual_seed(1))
    reference = layers["float"](rows)
    scale = float(reference.abs().max())
    return {
        kind: float((layer(rows) - reference).abs().max()) / scale for kind, layer in layers.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=200, help="calls per layer per timing")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    shapes: dict[str, dict] = {}
    with torch.inference_mode():
        for index, (name, out_features, in_features, copies) in enumerate(SHAPES):
            layers = layers_of(out_features, in_features, seed=index)
            row = torch.randn(1, in_features)
            for layer in layers.values():  # warm-up: kernels, packing, allocator
                seconds_per_call(layer, row, 10)
            times: dict[str, list[float]] = {kind: [] for kind in KINDS}
            for _ in range(args.rounds):
                for kind in KINDS:
                    times[kind].append(seconds_per_call(layers[kind], row, args.calls))
            shapes[name] = {
                "out_features": out_features,
                "in_features": in_features,
                "copies_per_decoder_layer": copies,
                "seconds_per_call": times,
                "relative_output_error": output_errors(layers, in_features),
                "distill_paths": {
                    kind: layers[kind].path for kind in ("distill_int8", "distill_int4")
                },
            }
            print(f"{name}: " + ", ".join(f"{k} {min(v) * 1e6:.0f} us" for k, v in times.items()))

    def decoder_layer_rounds(kind: str) -> list[float]:
        # seconds per token of one decoder layer's seven Linears, round by round
        return [
            sum(
                shape["seconds_per_call"][kind][r] * shape["copies_per_decoder_layer"]
                for shape in shapes.values()
            )
            for r in range(args.rounds)
        ]

    layer_rounds = {kind: decoder_layer_rounds(kind) for kind in KINDS}
    head_rounds = {kind: shapes["head"]["seconds_per_call"][kind] for kind in KINDS}
    for rounds in (layer_rounds, head_rounds):
        for bits in ("int8", "int4"):
            # the faster of the two engines, round by round: what distill should match
            rounds[f"best_{bits}"] = list(
                map(min, rounds[f"kernel_{bits}"], rounds[f"torchao_{bits}"])
            )
    ratios = {
        f"{part}_{slow}_over_{fast}": paired_ratio(rounds[slow], rounds[fast])
        for part, rounds in (("decoder_layer", layer_rounds), ("head", head_rounds))
        for bits in ("int8", "int4")
        for slow, fast in (
            (f"best_{bits}", f"distill_{bits}"),
            (f"torchao_{bits}", f"kernel_{bits}"),
            (f"distill_{bits}", "float"),
            (f"torchao_{bits}", "float"),
        )
    }
    print_table(
        [
            (name, f"{r['median']:.2f}", f"{r['spread'][0]:.2f}-{r['spread'][1]:.2f}")
            for name, r in ratios.items()
        ],
        ("time ratio (median of rounds)", "median", "spread"),
    )
    # distill's layer as fast as the faster engine (within the rounds' noise), in the decoder
    # and at the head
    targets = [
        target(
            f"best_vs_distill_{bits}_{part}_time",
            ratios[f"{part}_best_{bits}_over_distill_{bits}"]["median"],
            0.9,
            "higher",
        )
        for part in ("decoder_layer", "head")
        for bits in ("int8", "int4")
    ]
    for t in targets:
        print(
            f"{t['name']}: {t['value']:.2f} (target >= {t['target']}): {'met' if t['met'] else 'MISSED'}"
        )
    import torchao

    path = write_results(
        "weight_only_kernels",
        {
            "targets": targets,
            "setup": {
                "threads": args.threads,
                "rounds": args.rounds,
                "calls": args.calls,
                "group_size": GROUP,
                "torchao": torchao.__version__,
                "input": "one float32 row (batch-1 decoding), inference mode",
            },
            "ratios": ratios,
            "decoder_layer_seconds": layer_rounds,
            "torchao_max_weights": TORCHAO_MAX_WEIGHTS,
            "shapes": shapes,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
