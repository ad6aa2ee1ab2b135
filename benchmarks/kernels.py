# ruff: noqa: B023  (the lambdas are benchmarked inside the loop iteration that defines them)
"""Micro-benchmark of hf_yoco's Triton kernels vs their PyTorch references vs SDPA (needs a CUDA GPU).

    python benchmarks/kernels.py                 # bf16, B=4, H=8, D=128, T in 512..8192
    python benchmarks/kernels.py --dtype float16 --lengths 1024 4096

Prints one table per op: milliseconds for forward and forward+backward (median of `triton.testing.do_bench`).
Gated retention compares the chunk kernel with the PyTorch chunkwise form of `modeling_yoco` and with causal SDPA
(the softmax attention it replaces); sliding-window attention compares with SDPA given the window mask; shared-KV
decode (T=1 over S keys) compares with SDPA on the repeated KV heads.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


def bench(fn, backward: bool) -> float:
    from triton.testing import do_bench

    if not backward:
        with torch.no_grad():
            return do_bench(fn)

    def step():
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out))

    return do_bench(step)


def leaf(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, device="cuda", dtype=dtype) * scale).requires_grad_()


def row(name: str, length: int, fns: dict) -> str:
    cells = []
    for fn in fns.values():
        for backward in (False, True):
            try:
                cells.append(f"{bench(fn, backward):9.3f}")
            except torch.OutOfMemoryError:
                cells.append(f"{'OOM':>9}")
            torch.cuda.empty_cache()
    return f"{name:<24}{length:>7} " + " ".join(cells)


def header(labels: list[str]) -> str:
    cols = " ".join(f"{label[:5] + ' ' + mode:>9}" for label in labels for mode in ("fwd", "f+b"))
    return f"{'op':<24}{'T':>7} {cols}\n# ms; columns: " + ", ".join(labels) + " (fwd, fwd+bwd each)"


def main() -> None:
    from hf_yoco.kernels.gated_retention.chunk import chunk_gated_retention
    from hf_yoco.kernels.shared_kv_attention.decode import shared_kv_attention
    from hf_yoco.kernels.sliding_window_attention.chunk import sliding_window_attention
    from hf_yoco.models.modeling_yoco import chunk_gated_retention as torch_chunk_gated_retention

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernels.py needs a CUDA GPU (the CPU path runs the Triton interpreter).")
    dtype = getattr(torch, args.dtype)
    B, H, HKV, D = args.batch, args.heads, args.kv_heads, args.head_dim
    print(f"# {torch.cuda.get_device_name()}  dtype={args.dtype} B={B} H={H} H_kv={HKV} D={D} W={args.window}")

    print("\n## gated retention\n" + header(["triton", "torch-chunk", "sdpa"]))
    for T in args.lengths:
        q, k, v = (leaf(B, T, H, D, dtype=dtype) for _ in range(3))
        g = (F.logsigmoid(torch.randn(B, T, H, device="cuda")) / 16).requires_grad_()
        qs, ks, vs = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
        print(row("gated_retention", T, {
            "triton": lambda: chunk_gated_retention(q, k, v, g)[0],
            "torch": lambda: torch_chunk_gated_retention(q, k * D**-0.5, v, g, 64)[0],
            "sdpa": lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True),
        }))  # fmt: skip

    print(f"\n## sliding-window attention (W={args.window}, GQA {H}/{HKV})\n" + header(["triton", "sdpa-mask"]))
    for T in args.lengths:
        q, k, v = leaf(B, T, H, D, dtype=dtype), leaf(B, T, HKV, D, dtype=dtype), leaf(B, T, HKV, D, dtype=dtype)
        i = torch.arange(T, device="cuda")
        mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - args.window)
        qs = q.detach().transpose(1, 2).requires_grad_()
        ks, vs = (x.detach().transpose(1, 2).repeat_interleave(H // HKV, 1).requires_grad_() for x in (k, v))
        print(row("sliding_window_attention", T, {
            "triton": lambda: sliding_window_attention(q, k, v, window_size=args.window),
            "sdpa": lambda: F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask),
        }))  # fmt: skip

    print(f"\n## shared-KV decode (T=1 over S keys, GQA {H}/{HKV}; forward only)\n" + header(["triton", "sdpa"]))
    for S in args.lengths:
        q = torch.randn(B, 1, H, D, device="cuda", dtype=dtype)
        k, v = (torch.randn(B, S, HKV, D, device="cuda", dtype=dtype) for _ in range(2))
        qs = q.transpose(1, 2)
        ks, vs = (x.transpose(1, 2).repeat_interleave(H // HKV, 1) for x in (k, v))
        cells = [
            bench(lambda: shared_kv_attention(q, k, v), False),
            bench(lambda: F.scaled_dot_product_attention(qs, ks, vs), False),
        ]
        print(f"{'shared_kv_attention':<24}{S:>7} {cells[0]:9.3f} {'-':>9} {cells[1]:9.3f} {'-':>9}")


if __name__ == "__main__":
    main()
