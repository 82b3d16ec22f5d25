"""The runs of the quality suite (``benchmarks.quality``) and the budget they share: :class:`SuiteConfig`,
:class:`RunSpec` and :func:`default_suite`."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .peers import PEER_PACKAGES

ATTENTIONS = ("fma", "sdpa", *PEER_PACKAGES)
"""``fma`` (the config's ``fma_*`` fields choose the variant), ``sdpa`` (dense), and the peers of benchmarks.peers."""


@dataclass
class SuiteConfig:
    """The budget every run shares. Defaults: what one run of ~3-4 minutes on one shared CPU thread affords:
    120 steps of 4 x 2048 tokens (~1M tokens, a quarter of the training plays) for a 2-layer, width-128
    model; the probe takes 8 sequences of 1024 per step."""

    seq_len: int = 2048
    batch_size: int = 4
    steps: int = 120
    learning_rate: float = 2e-3
    warmup_steps: int = 15
    weight_decay: float = 0.1
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    block_size: int = 64
    coarse_tokens: int = 4
    eval_batch_size: int = 8
    max_test_documents: int | None = None
    max_test_tokens: int | None = None
    extrapolation: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    extrapolation_tokens: int = 32768
    probe_len: int = 1024
    probe_batch_size: int = 8
    probe_steps: int = 120
    probe_eval_examples: int = 256
    corpus: str = "shakespeare"

    def __post_init__(self) -> None:
        for name in (
            "seq_len",
            "batch_size",
            "steps",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "block_size",
            "coarse_tokens",
            "eval_batch_size",
            "probe_len",
            "probe_batch_size",
            "probe_steps",
            "probe_eval_examples",
            "extrapolation_tokens",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)}")
        if self.probe_len < 8 * self.block_size:
            raise ValueError(
                f"`probe_len` ({self.probe_len}) must be at least 8 * block_size ({8 * self.block_size}) "
                "so that the stored value lies beyond the near field"
            )


@dataclass(frozen=True)
class RunSpec:
    """One training run: its name (the resume key), task, attention, FMTConfig overrides and seed; ``steps``
    overrides the suite's budget (the longer-budget rows)."""

    name: str
    attention: str = "fma"
    overrides: tuple[tuple[str, object], ...] = ()
    seed: int = 0
    task: str = "lm"  # "lm" (held-out bits per byte) or "probe" (long-range recall accuracy)
    extrapolate: bool = False
    group: str = "main"  # which table the row belongs to: main, probe, seeds, ablation, long
    steps: int | None = None
    probe_len: int | None = None  # a probe run's own sequence length (default: the suite's)

    def __post_init__(self) -> None:
        if self.attention not in ATTENTIONS:
            raise ValueError(f"`attention` must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.task not in ("lm", "probe"):
            raise ValueError(f"`task` must be 'lm' or 'probe', got {self.task!r}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"`steps` must be a positive integer, got {self.steps}")
        if self.probe_len is not None and self.task != "probe":
            raise ValueError(f"`probe_len` is for probe runs; {self.name!r} is a {self.task!r} run")

    def length(self, cfg: SuiteConfig) -> int:
        """The sequence length this run trains at."""
        return cfg.seq_len if self.task == "lm" else self.probe_len or cfg.probe_len


def default_suite() -> list[RunSpec]:
    """The suite's runs: the main comparison, the long-range probe, a second seed for dense and FMA-depthwise, the
    ablations over m, p, scale_attn and the boundary, and FMA-depthwise, dense and the sliding window again at 2x
    the steps (does the ranking hold with more training?). Ordered so the headline rows finish first."""

    def fine(family, **kw):
        return (("fma_downsample", family), *kw.items())

    main = [
        RunSpec("fma-depthwise", overrides=fine("depthwise")),
        RunSpec("dense", attention="sdpa", extrapolate=True),
        RunSpec("sliding-window", attention="sliding", extrapolate=True),
        RunSpec("h-transformer-1d", attention="h_transformer_1d", extrapolate=True),
        RunSpec("fma-recursive", overrides=fine("recursive"), extrapolate=True),
        RunSpec("fma-avgpool", overrides=fine("avgpool"), extrapolate=True),
        RunSpec("fma-coarse-queries", overrides=fine("depthwise", fma_query_mode="coarse")),
    ]
    probe = [
        RunSpec(f"probe/{spec.name}", spec.attention, spec.overrides, task="probe", group="probe") for spec in main[:3]
    ]
    seeds = [replace(spec, name=f"{spec.name}-seed1", seed=1, extrapolate=False, group="seeds") for spec in main[:2]]
    ablation = [
        RunSpec(f"fma-depthwise-{tag}", overrides=fine("depthwise", **{key: value}), group="ablation")
        for tag, key, value in (
            ("m32", "fma_block_size", 32),
            ("m128", "fma_block_size", 128),
            ("p2", "fma_coarse_tokens", 2),
            ("p8", "fma_coarse_tokens", 8),
            ("noscale", "fma_scale_attn", False),
            ("zerosink", "fma_boundary", "zero_sink"),
        )
    ]
    # the value stored thousands of tokens before the question (FMA and dense; the window cannot reach it)
    probe_far = [replace(spec, name=f"{spec.name}-4096", probe_len=4096) for spec in probe[:2]]
    longer = [
        replace(spec, name=f"{spec.name}-240steps", steps=240, extrapolate=False, group="long") for spec in main[:3]
    ]
    # Last: on CPU its causal prefix sums run ~5x slower than the others (no length extrapolation, for the budget).
    performer = [RunSpec("performer", attention="performer")]
    return main + probe + seeds + ablation + probe_far + longer + performer
