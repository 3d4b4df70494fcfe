"""Benchmark the 4x1 block-sparse int8 GEMM against dense int8 / fp32 / bf16 on BERT-style Linear shapes.

    python benchmarks/sparse_gemm.py [--threads 2] [--rounds 15] [--path avx512_vnni]

Times are medians over rounds (each round = enough calls for ~20 ms). GOP/s counts dense-equivalent work
(2 * n * in * out), so a sparse kernel's GOP/s is "effective" and directly comparable with the dense ones.
Dense int8 is the faster of torch._int_mm (int8 x int8 -> int32, weight pre-transposed once) and
torch.ops.quantized.linear (fbgemm, per-channel weights, prepacked, uint8 activations -> uint8 output).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from fastcpu_runtime.kernels import available_paths, pack_4x1, sparse_int8_gemm, sparse_linear

SHAPES = {  # model: [(in, out)]
    "distilbert": [(768, 768), (768, 3072), (3072, 768)],
    "minilm": [(384, 384), (384, 1536), (1536, 384)],
}
TOKENS = (128, 1024)
SPARSITIES = (0.7, 0.8, 0.9)


def timeit(fn: Callable[[], object], rounds: int) -> float:
    """Median seconds per call over `rounds` rounds, each long enough (~20 ms) to dwarf timer noise."""
    for _ in range(3):
        fn()
    start = time.perf_counter()
    fn()
    per_call = max(time.perf_counter() - start, 1e-6)
    reps = max(1, int(0.02 / per_call))
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        samples.append((time.perf_counter() - start) / reps)
    return statistics.median(samples)


def block_sparse_weight(out: int, n_in: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    """Random int8 weight with exactly round(sparsity * blocks) 4x1 blocks zeroed."""
    w = torch.randint(-127, 128, (out, n_in), dtype=torch.int8, generator=gen)
    blocks = out // 4 * n_in
    keep = torch.zeros(blocks, dtype=torch.bool)
    keep[torch.randperm(blocks, generator=gen)[: blocks - round(sparsity * blocks)]] = True
    mask = keep.view(out // 4, 1, n_in).expand(out // 4, 4, n_in).reshape(out, n_in)
    return w * mask


def dense_int8(x_u8: torch.Tensor, w: torch.Tensor, rounds: int) -> tuple[float, str]:
    """Best dense int8 time and which implementation gave it."""
    results = {}
    x_s8 = (x_u8.int() - 128).to(torch.int8)
    w_t = w.t().contiguous()  # [in, out]: the layout torch._int_mm is fast with on CPU
    try:
        torch._int_mm(x_s8, w_t)
        results["_int_mm"] = timeit(lambda: torch._int_mm(x_s8, w_t), rounds)
    except RuntimeError:
        pass
    for engine in ("fbgemm", "onednn"):
        if engine not in torch.backends.quantized.supported_engines:
            continue
        torch.backends.quantized.engine = engine
        scales = torch.full((w.shape[0],), 0.01)
        qw = torch.quantize_per_channel(
            w.float() * 0.01, scales, torch.zeros_like(scales, dtype=torch.long), 0, torch.qint8
        )
        packed = torch.ops.quantized.linear_prepack(qw, None)
        qx = torch._make_per_tensor_quantized_tensor(x_u8, 0.05, 128)
        results[f"q.linear/{engine}"] = timeit(
            lambda qx=qx, packed=packed: torch.ops.quantized.linear(qx, packed, 1.0, 128), rounds
        )
    torch.backends.quantized.engine = (
        "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"
    )
    name = min(results, key=results.get)
    return results[name], name


def bench_shape(
    n: int, n_in: int, out: int, rounds: int, path: str | None, gen: torch.Generator
) -> list[str]:
    x_u8 = torch.randint(0, 256, (n, n_in), dtype=torch.uint8, generator=gen)
    wf = torch.randn(out, n_in, generator=gen)
    xf = torch.randn(n, n_in, generator=gen)
    t_fp32 = timeit(lambda: torch.nn.functional.linear(xf, wf), rounds)
    wb, xb = wf.bfloat16(), xf.bfloat16()
    t_bf16 = timeit(lambda: torch.nn.functional.linear(xb, wb), rounds)
    t_i8, i8_name = dense_int8(
        x_u8, torch.randint(-127, 128, (out, n_in), dtype=torch.int8, generator=gen), rounds
    )
    gops = lambda t: 2 * n * n_in * out / t / 1e9  # noqa: E731
    rows = []
    for sparsity in SPARSITIES:
        w = block_sparse_weight(out, n_in, sparsity, gen)
        packed = pack_4x1(w)
        t_sp = timeit(lambda p=packed: sparse_int8_gemm(x_u8, p, path), rounds)
        scale = torch.full((out,), 0.01)
        t_lin = timeit(lambda p=packed, s=scale: sparse_linear(x_u8, 0.05, 128, p, s, None, path), rounds)
        rows.append(
            f"{n:>5} {n_in:>5}->{out:<5} {sparsity:>4.0%} {packed.density:>6.3f} "
            + " ".join(f"{t * 1e6:>9.1f}" for t in (t_sp, t_lin, t_i8, t_fp32, t_bf16))
            + f" {gops(t_sp):>8.0f} {gops(t_i8):>8.0f} "
            + " ".join(f"{t / t_sp:>7.2f}x" for t in (t_i8, t_fp32, t_bf16))
            + f"  {i8_name}"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--path", default=None, help="force a code path (default: fastest available)")
    parser.add_argument("--models", nargs="*", default=list(SHAPES))
    parser.add_argument("--tokens", nargs="*", type=int, default=list(TOKENS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, paths {available_paths()}, "
        f"using {args.path or available_paths()[0]}"
    )
    print(
        "times in us (median); GOP/s = dense-equivalent 2*n*in*out / time; "
        "dens = stored blocks incl. padding; sp+epi = sparse_linear (fused float output)"
    )
    header = (
        f"{'n':>5} {'shape':>11} {'spars':>5} {'dens':>6} {'sparse':>9} {'sp+epi':>9} {'int8':>9} "
        f"{'fp32':>9} {'bf16':>9} {'spGOP/s':>8} {'i8GOP/s':>8} "
        f"{'vs i8':>8} {'vs fp32':>8} {'vs bf16':>8}  int8 impl"
    )
    for model in args.models:
        print(f"\n## {model}")
        print(header)
        for n in args.tokens:
            for n_in, out in SHAPES[model]:
                for row in bench_shape(n, n_in, out, args.rounds, args.path, gen):
                    print(row, flush=True)


if __name__ == "__main__":
    main()
