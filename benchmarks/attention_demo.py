"""FMA against dense attention on random inputs, and the command of ``scripts/demo_attention.py``
(:class:`DemoAttentionArguments`, :func:`demo_attention`): that exactness table, then a short speed/memory sweep of
``benchmarks.attention``.

Exactness: at n = 2m the partition is the whole causal triangle, so FMA equals dense attention to rounding; with
identity pooling (avgpool, p = m) at n = 4m every coarse token is one fine token, so it is exact too. At longer n FMA
approximates far keys by coarse summaries: the table gives its relative error at the untrained average init, beside
local attention alone (FMA's level 0).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fmt_hf.model.fma_attention import FastMultipoleAttention

from .attention import BenchConfig, run_benchmark
from .attention_report import format_table, plot_results, write_results


def fine_level_mask(n: int, block_size: int, causal: bool) -> torch.Tensor:
    """(n, n) bool: the keys FMA's level 0 covers (§3) -- local attention without any far field."""
    block = torch.arange(n) // block_size
    near = (block[:, None] - block[None, :]).abs() <= 1
    if causal:
        near &= torch.arange(n)[None, :] <= torch.arange(n)[:, None]
    return near


def dense_agreement(
    n: int,
    causal: bool = True,
    dtype: torch.dtype = torch.float32,
    *,
    max_seq_len: int | None = None,
    heads: int = 4,
    head_dim: int = 64,
    seed: int = 0,
    local_baseline: bool = False,
    **fma_kwargs,
) -> dict:
    """FMA (fresh module, default average init) against dense SDPA on one random N(0, 1) q, k, v.

    Returns ``max_abs`` (max |FMA - dense|) and ``rel`` (||FMA - dense||_F / ||dense||_F); with
    ``local_baseline`` also ``local_rel``: the same error for attention restricted to FMA's level-0 keys, i.e.
    what FMA would be without its coarse levels.
    """
    torch.manual_seed(seed)
    q, k, v = (torch.randn(1, heads, n, head_dim, dtype=dtype) for _ in range(3))
    attn = FastMultipoleAttention(head_dim, max_seq_len or n, causal=causal, **fma_kwargs).to(dtype)
    with torch.no_grad():
        out = attn(q, k, v)
        dense = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        result = {
            "n": n,
            "causal": causal,
            "dtype": str(dtype).replace("torch.", ""),
            "max_abs": (out - dense).abs().max().item(),
            "rel": ((out - dense).norm() / dense.norm()).item(),
        }
        if local_baseline:
            local = F.scaled_dot_product_attention(q, k, v, attn_mask=fine_level_mask(n, attn.block_size, causal))
            result["local_rel"] = ((local - dense).norm() / dense.norm()).item()
    return result


DEMO_BLOCK_SIZE = 64
"""m of every exactness check."""


def exactness_checks() -> list[tuple[str, dict]]:
    """(label, kwargs for dense_agreement) -- every row is one FMA vs dense comparison."""
    checks = []
    for causal in (True, False):
        for dtype in (torch.float32, torch.float64):
            checks.append(
                ("n = 2m equals dense", dict(n=2 * DEMO_BLOCK_SIZE, causal=causal, dtype=dtype, max_seq_len=4096))
            )
    for causal in (True, False):
        checks.append(
            (
                "identity pooling (avgpool, p = m)",
                dict(
                    n=4 * DEMO_BLOCK_SIZE,
                    causal=causal,
                    dtype=torch.float64,
                    downsample="avgpool",
                    coarse_tokens=DEMO_BLOCK_SIZE,
                ),
            )
        )
    for n in (1024, 4096):
        for causal in (True, False):
            checks.append(
                ("approximation, average init", dict(n=n, causal=causal, dtype=torch.float32, local_baseline=True))
            )
    return checks


def exactness_table(progress: bool = True) -> str:
    """Every check of :func:`exactness_checks`, as a plain-text table."""
    rows = []
    for label, kwargs in tqdm(exactness_checks(), desc="exactness", disable=not progress, dynamic_ncols=True):
        rows.append((label, dense_agreement(block_size=DEMO_BLOCK_SIZE, **kwargs)))
    lines = [
        f"{'check':<36} {'n':>5} {'mode':>6} {'dtype':>7} {'max|FMA-dense|':>15} {'rel err':>9} "
        f"{'local-only rel err':>18}"
    ]
    for label, r in rows:
        local = f"{r['local_rel']:.3f}" if "local_rel" in r else "-"
        lines.append(
            f"{label:<36} {r['n']:>5} {'causal' if r['causal'] else 'bidir':>6} {r['dtype']:>7} "
            f"{r['max_abs']:>15.2e} {r['rel']:>9.2e} {local:>18}"
        )
    lines.append(
        "rel err = ||FMA - dense||_F / ||dense||_F on random N(0,1) q, k, v (B=1, H=4, d=64, m=64, p=4 "
        "unless stated); local-only = dense attention restricted to FMA's level-0 keys (no far field)."
    )
    return "\n".join(lines)


@dataclass
class DemoAttentionArguments:
    """The command line of ``scripts/demo_attention.py``."""

    lengths: list[int] = field(
        default_factory=lambda: [1024, 2048, 4096, 8192], metadata={"help": "lengths of the speed/memory sweep"}
    )
    repeats: int = field(default=3, metadata={"help": "timed samples per implementation and length"})
    out: str = field(
        default="outputs/demo_attention.png",
        metadata={"help": "plot path; <stem>.csv and <stem>.json are written beside it"},
    )
    no_progress: bool = field(default=False, metadata={"help": "no progress bars"})


def demo_attention(args: DemoAttentionArguments) -> None:
    """Print the exactness table, then sweep FMA against SDPA (causal, fwd and fwd+bwd) and write its artifacts."""
    progress = not args.no_progress
    print("== 1. Exactness against dense attention (SDPA)\n")
    print(exactness_table(progress))

    print("\n== 2. Speed and memory: FMA vs dense SDPA, causal\n")
    cfg = BenchConfig(repeats=args.repeats, budget_s=10.0)
    rows, meta = run_benchmark(
        args.lengths, ["causal"], ["fwd", "fwd+bwd"], cfg, matmul_repeats=3, progress=progress, desc="speed/memory"
    )
    print(format_table(rows, meta))
    png = plot_results(rows, args.out, title="FMA (m=64, p=4) vs dense SDPA, causal, float32 (demo)")
    csv_path, json_path = write_results(rows, meta, png)
    print("\nartifacts:")
    for path in (png, csv_path, json_path):
        print(f"  {os.path.abspath(path)}")
    print("full benchmark (1K..64K, causal and bidirectional): make bench  (scripts/bench_attention.py --help)")
