"""Peak extra memory and forward + backward time of the distillation loss on the output head.

Student hidden states ``[N, H]`` and head ``[V, H]``, ``N`` in {2048, 8192, 16384}, ``V = 49152``,
``H = 576`` (SmolLM2-135M), float32, CPU, T = 2, alpha = 0.5, forward KL. Methods:

- ``seed``: logits = hidden @ W^T, then the unfused ``distillation_loss`` on full logits (what
  ``loss.fused=false`` runs); teacher logits ``[N, V]`` given.
- ``fused``: ``fused_distillation_loss`` (chunk from the default 512 MB budget); same inputs.
- ``liger``: Liger-Kernel's pure-PyTorch chunked ``LigerFusedLinearJSDLoss`` (beta = 0 is its
  forward KL), eager and ``torch.compile``-d, its default chunk of 1024 rows; it takes the
  teacher as hidden states ``[N, H]`` + head ``[V, H]``, so it is compared with ``fused_th``,
  our fused loss given the same teacher inputs (and, like Liger, no T^2 factor), at our default
  chunk (682 rows: 4 buffers of ``[c, V]`` in 512 MB) and at Liger's (``fused_th_1024``). The
  losses and gradient norms must agree to 1e-5 (relative), or the script stops.

Each case runs in a fresh process: one warm-up call at N = 1024 (the compiled Liger's is at
full size: it recompiles for each new N, and its compilation is not timed), inputs built in
place, the peak-RSS mark reset (``/proc/self/clear_refs``); peak extra memory = VmHWM during
one forward + backward minus VmRSS just before it (the inputs). Time = the median of ``--reps``
(5) calls on the same inputs, the first included; every call's time is kept. The cases run one
after another, each in its own process (memory needs a fresh one), not interleaved.
Needs ``pip install liger-kernel`` (the ``bench`` extra) for the Liger cases; without it the
script stops with that line (``--no-liger`` runs the rest and writes no Liger targets).

    python benchmarks/losses.py                 # about 10 minutes on 2 cores
    python benchmarks/losses.py --sizes 2048 --liger-sizes 2048   # a quick look
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import print_table, target, write_results

V, H = 49152, 576
TEMPERATURE, ALPHA = 2.0, 0.5
SIZES = (2048, 8192, 16384)
LIGER_MODES = ("liger_eager", "liger_compiled")
COMPARE_AT = 8192
LIGER_CHUNK = 1024  # LigerFusedLinearJSDLoss's default chunk_size (rows)
AGREEMENT = 1e-5  # relative: our fused loss and Liger's, same inputs, float32


# --- one case, in a fresh process --------------------------------------------------------------


def _proc_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def _inputs(rows: int, teacher_as_hidden: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs built in place (no temporaries), so the RSS before the call is exactly them."""
    torch.manual_seed(seed)
    inputs = {
        "hidden": torch.randn(rows, H).requires_grad_(True),
        "weight": torch.randn(V, H).mul_(H**-0.5 * 2).requires_grad_(True),
        "labels": torch.randint(0, V, (rows,)),
    }
    inputs["labels"][255::256] = -100  # the last position of each 256-token block
    if teacher_as_hidden:
        inputs["teacher_hidden"] = torch.randn(rows, H)
        inputs["teacher_weight"] = torch.randn(V, H).mul_(H**-0.5 * 3)
    else:
        inputs["teacher_logits"] = torch.randn(rows, V).mul_(3.0)
    return inputs


def _chunk_rows(method: str) -> int:
    """Rows per chunk of a method: ours automatic (0 here, :func:`_effective_chunk` says how
    many), Liger's its default, ``fused_th_1024`` ours at Liger's."""
    return LIGER_CHUNK if method.startswith("liger") or method == "fused_th_1024" else 0


def _effective_chunk(method: str) -> int | None:
    """The rows per chunk a case actually used (None: the unfused loss has no chunks)."""
    from distill.losses.fused import DEFAULT_MEMORY_BUDGET_MB, auto_chunk_size, chunk_buffers

    if method == "seed":
        return None
    return _chunk_rows(method) or auto_chunk_size(
        V, DEFAULT_MEMORY_BUDGET_MB, chunk_buffers("forward_kl", True)
    )


def _loss_fn(method: str):
    """``fn(inputs) -> scalar loss`` (mean over unmasked tokens) for one method."""
    from distill.losses import distillation_loss, fused_distillation_loss

    if method == "seed":

        def seed(x):
            logits = x["hidden"] @ x["weight"].T  # (N, V)
            terms = distillation_loss(
                logits, x["teacher_logits"], x["labels"], temperature=TEMPERATURE, alpha=ALPHA
            )
            return terms.loss_sum / terms.n_tokens

        return seed
    if method in ("fused", "fused_th", "fused_th_1024"):

        def fused(x):
            terms = fused_distillation_loss(
                x["hidden"],
                x["weight"],
                x.get("teacher_logits"),
                x["labels"],
                teacher_hidden=x.get("teacher_hidden"),
                teacher_weight=x.get("teacher_weight"),
                temperature=TEMPERATURE,
                alpha=ALPHA,
                scale_by_t2=method == "fused",  # fused_th: no T^2, like Liger
                chunk_size=_chunk_rows(method),
            )
            return terms.loss_sum / terms.n_tokens

        return fused
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    module = LigerFusedLinearJSDLoss(
        weight_hard_loss=ALPHA,
        weight_soft_loss=1 - ALPHA,
        beta=0.0,  # Liger's beta = 0: KL(teacher || student), the forward KL
        temperature=TEMPERATURE,
        compiled=method == "liger_compiled",
        chunk_size=LIGER_CHUNK,
    )

    def liger(x):
        return module(
            x["hidden"], x["weight"], x["teacher_hidden"], x["teacher_weight"], x["labels"]
        )

    return liger


def run_case(method: str, rows: int, reps: int) -> dict:
    """Warm up, then measure ``reps`` forward + backward calls on the same inputs: the peak
    memory of the first, the median time of all."""
    teacher_as_hidden = method not in ("seed", "fused")
    fn = _loss_fn(method)
    # The compiled Liger guards on N (it recompiles for a new N), so it warms up at full size.
    warm_rows = rows if method == "liger_compiled" else 1024
    fn(_inputs(warm_rows, teacher_as_hidden, seed=1)).backward()
    inputs = _inputs(rows, teacher_as_hidden)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark
    baseline_kb = _proc_kb("VmRSS")
    start = time.perf_counter()
    loss = fn(inputs)
    loss.backward()
    seconds = [time.perf_counter() - start]
    peak_kb = _proc_kb("VmHWM")
    gradients = (float(inputs["hidden"].grad.norm()), float(inputs["weight"].grad.norm()))
    for _ in range(reps - 1):  # the same call again: time only (the memory is the first's)
        inputs["hidden"].grad = inputs["weight"].grad = None
        start = time.perf_counter()
        fn(inputs).backward()
        seconds.append(time.perf_counter() - start)
    return {
        "method": method,
        "rows": rows,
        "chunk_rows": _effective_chunk(method),
        "seconds": statistics.median(seconds),
        "seconds_all": seconds,
        "peak_extra_mb": (peak_kb - baseline_kb) / 1024,
        "inputs_mb": baseline_kb / 1024,
        "loss": float(loss.detach()),
        "grad_hidden_norm": gradients[0],
        "grad_weight_norm": gradients[1],
    }


# --- the driver --------------------------------------------------------------------------------


def _available_mb() -> float:
    text = Path("/proc/meminfo").read_text()
    return int(re.search(r"MemAvailable:\s+(\d+) kB", text).group(1)) / 1024


def _spawn(method: str, rows: int, threads: int, reps: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    command = [sys.executable, __file__, "--case", method, str(rows), "--threads", str(threads)]
    command += ["--reps", str(reps)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"method": method, "rows": rows, "error": " | ".join(tail)}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _liger_available() -> str | None:
    """None if Liger's chunked loss imports and runs on this machine, else why not."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except Exception as err:  # noqa: BLE001 - any import failure means "not measurable"
        return f"liger-kernel does not import: {type(err).__name__}: {err}"
    try:
        x = torch.randn(8, 4, requires_grad=True)
        w = torch.randn(16, 4, requires_grad=True)
        loss = LigerFusedLinearJSDLoss(compiled=False)(
            x, w, x.detach(), w.detach(), torch.zeros(8, dtype=torch.long)
        )
        loss.backward()
    except Exception as err:  # noqa: BLE001
        return f"liger-kernel's chunked loss does not run on CPU: {type(err).__name__}: {err}"
    return None


def relative_differences(cases: list[dict]) -> dict[str, float]:
    """The largest relative difference from the first case, per compared quantity."""
    first = cases[0]
    keys = ("loss", "grad_hidden_norm", "grad_weight_norm")
    return {
        key: max(abs(case[key] - first[key]) / abs(first[key]) for case in cases) for key in keys
    }


def check_agreement(cases: list[dict]) -> None:
    """Stop unless every case computed the same loss and gradients (same inputs)."""
    differences = relative_differences(cases)
    worst = max(differences.values())
    names = ", ".join(case["method"] for case in cases)
    print(f"agreement of {names}: largest relative difference {worst:.2e} ({differences})")
    if worst > AGREEMENT:
        sys.exit(f"benchmarks/losses.py: the losses disagree ({differences}, limit {AGREEMENT})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument(
        "--liger-sizes",
        type=int,
        nargs="*",
        default=[COMPARE_AT],
        help="sizes for fused_th and Liger (its compiled warm-up alone takes ~40 s per case)",
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-liger", action="store_true", help="skip the Liger-Kernel cases")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per case (median)")
    parser.add_argument("--case", nargs=2, metavar=("METHOD", "ROWS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.case:
        print(json.dumps(run_case(args.case[0], int(args.case[1]), args.reps)))
        return

    liger_problem = None if args.no_liger else _liger_available()
    if liger_problem:  # the comparison is a committed target: refuse to drop it silently
        sys.exit(
            f"benchmarks/losses.py: {liger_problem} (pip install -e '.[bench]', or --no-liger)"
        )
    results: list[dict] = []
    seed_mb_per_row = None
    for rows in sorted(set(args.sizes) | set(args.liger_sizes)):
        methods = ["seed", "fused"] if rows in args.sizes else []
        if rows in args.liger_sizes and not args.no_liger:
            methods += ["fused_th", "fused_th_1024", *LIGER_MODES]
        for method in methods:
            if method == "seed" and seed_mb_per_row is not None:
                need = seed_mb_per_row * rows + rows * V * 4 / 2**20  # extra + teacher logits
                if need > _available_mb() - 1024:
                    results.append(
                        {
                            "method": method,
                            "rows": rows,
                            "skipped": f"needs ~{need:.0f} MB, {_available_mb():.0f} MB available",
                        }
                    )
                    continue
            result = _spawn(method, rows, args.threads, args.reps)
            results.append(result)
            if method == "seed" and "seconds" in result:
                seed_mb_per_row = result["peak_extra_mb"] / rows
            print(json.dumps(result), flush=True)

    def get(method: str, rows: int) -> dict | None:
        found = [r for r in results if r["method"] == method and r["rows"] == rows]
        return found[0] if found and "seconds" in found[0] else None

    rows_out = []
    for r in results:
        if "seconds" not in r:
            note = r.get("skipped") or r["error"]
            rows_out.append((r["method"], str(r["rows"]), "-", "-", "-", "-", note[:70]))
            continue
        rows_out.append(
            (
                r["method"],
                str(r["rows"]),
                str(r["chunk_rows"] or "-"),
                f"{r['peak_extra_mb']:.0f}",
                f"{r['seconds']:.2f} ({min(r['seconds_all']):.2f}-{max(r['seconds_all']):.2f})",
                f"{r['loss']:.6f}",
                "",
            )
        )
    header = ("method", "N", "chunk rows", "peak extra MB", "fwd+bwd s (min-max)", "loss", "note")
    print_table(rows_out, header)

    targets = []
    seed, fused = get("seed", COMPARE_AT), get("fused", COMPARE_AT)
    if seed and fused:
        targets.append(
            target(
                "fused_peak_memory_ratio_n8192",
                fused["peak_extra_mb"] / seed["peak_extra_mb"],
                0.1,
                "lower",
            )
        )
        targets.append(
            target("fused_time_ratio_n8192", fused["seconds"] / seed["seconds"], 1.0, "lower")
        )
    small, large = get("fused", 2048), get("fused", 16384)
    if small and large:
        targets.append(
            target(
                "fused_memory_growth_2k_to_16k",
                large["peak_extra_mb"] / small["peak_extra_mb"],
                1.5,
                "lower",
            )
        )
    liger_note = "skipped: --no-liger" if args.no_liger else None
    ours = get("fused_th", COMPARE_AT)
    ligers = [r for r in (get(m, COMPARE_AT) for m in LIGER_MODES) if r]
    if ours and ligers:
        best_memory = min(ligers, key=lambda r: r["peak_extra_mb"])
        best_time = min(ligers, key=lambda r: r["seconds"])
        targets.append(
            target(
                "fused_vs_liger_memory_ratio",
                ours["peak_extra_mb"] / best_memory["peak_extra_mb"],
                1.0,
                "lower",
            )
            | {"against": best_memory["method"]}
        )
        targets.append(
            target(
                "fused_vs_liger_time_ratio", ours["seconds"] / best_time["seconds"], 1.0, "lower"
            )
            | {"against": best_time["method"]}
        )
        matched = get("fused_th_1024", COMPARE_AT)
        if matched:
            targets.append(
                target(
                    "fused_vs_liger_time_ratio_matched_chunk",
                    matched["seconds"] / best_time["seconds"],
                    1.0,
                    "lower",
                )
                | {"against": best_time["method"], "chunk_rows": LIGER_CHUNK}
            )
        check_agreement([r for r in (ours, matched, *ligers) if r])
        liger_note = "measured: liger-kernel chunked loss ran on CPU (eager and compiled)"
    elif not args.no_liger:
        sys.exit("benchmarks/losses.py: the Liger cases at N=8192 failed; see the results above")
    for t in targets:
        print(
            f"{t['name']}: {t['value']:.3f} (target {'<=' if t['better'] == 'lower' else '>='} "
            f"{t['target']}) {'met' if t['met'] else 'MISSED'}"
        )
    path = write_results(
        "losses",
        {
            "setup": {
                "vocab": V,
                "hidden": H,
                "dtype": "float32",
                "temperature": TEMPERATURE,
                "alpha": ALPHA,
                "divergence": "forward_kl",
                "sizes": args.sizes,
                "threads": args.threads,
                "masked": "last position of each 256-token block",
                "memory": "VmHWM - VmRSS before the call, fresh process per case, after warm-up",
                "liger": liger_note,
                "chunk_rows": {m: _effective_chunk(m) for m in ("fused", "fused_th_1024", "liger")},
                "agreement_limit": AGREEMENT,
                "timed_calls_per_case": args.reps,
            },
            "results": results,
            "targets": targets,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
