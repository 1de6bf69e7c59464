"""distill's weight-only layers against torchao's, one Linear at a time, batch 1, CPU float32.

distill quantizes weights by hand (the grids of ``distill.compress.quantize``) and runs them on
PyTorch's own CPU kernels (``torch._weight_int8pack_mm``, ``torch._weight_int4pack_mm_for_cpu``)
rather than through torchao. This measures why: the default student's Linear shapes (SmolLM2's
q/o 576x576, k/v 192x576, gate/up 1536x576, down 576x1536, the 49152x576 head), each as

- ``float``: ``nn.Linear``, float32;
- ``distill_int8``: :class:`~distill.compress.quantize.WeightOnlyLinear`, int8 per output row;
- ``torchao_int8``: torchao's ``Int8WeightOnlyConfig`` (int8 per row);
- ``distill_int4``: ``WeightOnlyLinear``, 4-bit groups of 64 with a scale and a minimum;
- ``torchao_int4``: torchao's ``IntxWeightOnlyConfig(int4, PerGroup(64), asymmetric)``, the
  same grid kind (its ``Int4WeightOnlyConfig`` needs the ``mslk`` package).

One input row (decoding at batch 1) through each layer ``--calls`` times is one timing; the five
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

HIDDEN, FFN, KV, VOCAB = 576, 1536, 192, 49152
# (name, out_features, in_features, copies in one decoder layer; the head is not in a layer)
SHAPES = (
    ("q_o", HIDDEN, HIDDEN, 2),
    ("k_v", KV, HIDDEN, 2),
    ("gate_up", FFN, HIDDEN, 2),
    ("down", HIDDEN, FFN, 1),
    ("head", VOCAB, HIDDEN, 0),
)
KINDS = ("float", "distill_int8", "torchao_int8", "distill_int4", "torchao_int4")
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
    """The five kinds of one Linear shape, all from the same random float weight."""
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=False)
    weight = torch.randn(out_features, in_features, generator=generator) * in_features**-0.5
    linear.weight.data.copy_(weight)
    q8, scale8 = quantize_rows(weight)
    q4, scale4, low4 = quantize_groups(weight, GROUP)
    return {
        "float": linear,
        "distill_int8": WeightOnlyLinear(q8, scale8),
        "torchao_int8": torchao_layer(linear, 8),
        "distill_int4": WeightOnlyLinear(q4, scale4, low=low4, group_size=GROUP),
        "torchao_int4": torchao_layer(linear, 4),
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
    ratios = {
        f"{part}_{name}": paired_ratio(rounds[slow], rounds[fast])
        for part, rounds in (("decoder_layer", layer_rounds), ("head", head_rounds))
        for name, slow, fast in (
            ("torchao_int8_over_distill_int8", "torchao_int8", "distill_int8"),
            ("torchao_int4_over_distill_int4", "torchao_int4", "distill_int4"),
            ("distill_int8_over_float", "distill_int8", "float"),
            ("distill_int4_over_float", "distill_int4", "float"),
            ("torchao_int8_over_float", "torchao_int8", "float"),
            ("torchao_int4_over_float", "torchao_int4", "float"),
        )
    }
    print_table(
        [
            (name, f"{r['median']:.2f}", f"{r['spread'][0]:.2f}-{r['spread'][1]:.2f}")
            for name, r in ratios.items()
        ],
        ("time ratio (median of rounds)", "median", "spread"),
    )
    targets = [
        # at least as fast as torchao's layer of the same kind, or torchao would be the one used
        target(
            "torchao_vs_distill_int8_decoder_layer_time",
            ratios["decoder_layer_torchao_int8_over_distill_int8"]["median"],
            1.0,
            "higher",
        ),
        target(
            "torchao_vs_distill_int4_decoder_layer_time",
            ratios["decoder_layer_torchao_int4_over_distill_int4"]["median"],
            1.0,
            "higher",
        ),
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
            "shapes": shapes,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
