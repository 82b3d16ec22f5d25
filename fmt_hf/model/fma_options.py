"""The options of a Fast Multipole Attention layer: their allowed values and the rules that tie them, stated once.

`FastMultipoleAttention` checks its arguments with `check_fma_options`; `FMTConfig` checks its fields with the same
function, through `fma_layer_options` (the arguments a config gives its layers) and `CONFIG_FIELDS` (so that its
errors name the config's fields).
"""

from __future__ import annotations

from .fma_downsample import DOWNSAMPLE_MODES, LENGTH_FREE_MODES
from .fma_flex import KERNELS

QUERY_MODES = ("fine", "coarse")
BOUNDARY_MODES = ("mask", "zero_sink")
# The `attn_implementation` under which FMT layers run FMA (the architecture's default).
FMA_ATTN_IMPLEMENTATION = "fma"

# The FMTConfig field behind each FastMultipoleAttention argument.
CONFIG_FIELDS = {
    "head_dim": "head_dim",
    "max_seq_len": "max_position_embeddings",
    "block_size": "fma_block_size",
    "coarse_tokens": "fma_coarse_tokens",
    "causal": "is_causal",
    "downsample": "fma_downsample",
    "query_mode": "fma_query_mode",
    "scale_attn": "fma_scale_attn",
    "boundary": "fma_boundary",
    "dropout": "attention_dropout",
    "sink_tokens": "fma_sink_tokens",
    "kernel": "fma_kernel",
    "near_blocks": "fma_near_blocks",
    "refine_groups": "fma_refine_groups",
}


def length_free(config) -> bool:
    """Whether the FMA layers of an `FMTConfig` take any length (docs/fma.md §7a): a length-free downsampler, and the
    `"mask"` boundary (under `"zero_sink"` a length-free layer's outputs depend on the input's length, so the model
    keeps its cap)."""
    return config.fma_downsample in LENGTH_FREE_MODES and config.fma_boundary == "mask"


def sequence_cap(config, attn_implementation: str | None = None) -> int | None:
    """The longest sequence (cached tokens included) an FMT model of `config` accepts under `attn_implementation`
    (None: FMA, the architecture's default), or None when nothing caps it: FMA layers that are not length-free are
    built for `max_position_embeddings`; the dense implementations (rotary embeddings, as Llama) have no hard limit."""
    if (attn_implementation or FMA_ATTN_IMPLEMENTATION) != FMA_ATTN_IMPLEMENTATION or length_free(config):
        return None
    return config.max_position_embeddings


def fma_layer_options(config) -> dict:
    """The `FastMultipoleAttention` arguments of every layer of an `FMTModel` built from `config`."""
    options = {argument: getattr(config, field) for argument, field in CONFIG_FIELDS.items()}
    if length_free(config):
        options["max_seq_len"] = None
    return options


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_fma_options(
    *,
    head_dim,
    max_seq_len,
    block_size,
    coarse_tokens,
    causal,
    downsample,
    query_mode,
    scale_attn,
    boundary,
    dropout,
    sink_tokens,
    kernel,
    near_blocks,
    refine_groups=0,
    names: dict[str, str] | None = None,
) -> None:
    """Raises a ValueError naming the first argument that breaks a rule, by its name in `names` when given (e.g.
    `CONFIG_FIELDS`), else by its own."""

    def name(argument: str) -> str:
        return (names or {}).get(argument, argument)

    for argument, value in (
        ("head_dim", head_dim),
        ("block_size", block_size),
        ("coarse_tokens", coarse_tokens),
        ("near_blocks", near_blocks),
    ):
        if not _is_int(value) or value < 1:
            raise ValueError(f"`{name(argument)}` must be a positive integer, got {value!r}.")
    if max_seq_len is not None and (not _is_int(max_seq_len) or max_seq_len < 1):
        raise ValueError(f"`{name('max_seq_len')}` must be a positive integer, got {max_seq_len!r}.")
    if coarse_tokens > block_size or block_size % coarse_tokens:
        raise ValueError(
            f"`{name('coarse_tokens')}` ({coarse_tokens}) must be at most, and divide, `{name('block_size')}` "
            f"({block_size})."
        )
    for argument, value, allowed in (
        ("causal", causal, (True, False)),
        ("downsample", downsample, DOWNSAMPLE_MODES),
        ("query_mode", query_mode, QUERY_MODES),
        ("scale_attn", scale_attn, (True, False)),
        ("boundary", boundary, BOUNDARY_MODES),
        ("kernel", kernel, KERNELS),
    ):
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            raise ValueError(f"`{name(argument)}` must be one of {allowed}, got {value!r}.")
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"`{name('dropout')}` must be in [0, 1), got {dropout!r}.")
    if not _is_int(sink_tokens) or not 0 <= sink_tokens <= block_size:
        raise ValueError(
            f"`{name('sink_tokens')}` must be an integer between 0 and `{name('block_size')}` ({block_size}), got "
            f"{sink_tokens!r}."
        )
    for argument, value, needed in (("query_mode", query_mode, "fine"), ("boundary", boundary, "mask")):
        if kernel == "flex" and value != needed:
            raise ValueError(
                f"`{name('kernel')}`='flex' needs `{name(argument)}`={needed!r}, got {value!r} (use 'gather' or "
                "'auto')."
            )
    if not _is_int(refine_groups) or refine_groups < 0:
        raise ValueError(f"`{name('refine_groups')}` must be a non-negative integer, got {refine_groups!r}.")
    if refine_groups:
        for argument, value, allowed in (
            ("query_mode", query_mode, ("fine",)),
            ("boundary", boundary, ("mask",)),
            ("kernel", kernel, ("auto", "gather")),
        ):
            if value not in allowed:
                raise ValueError(
                    f"`{name('refine_groups')}`={refine_groups} (adaptive refinement) needs `{name(argument)}` in "
                    f"{allowed}, got {value!r}."
                )
    if max_seq_len is None and downsample not in LENGTH_FREE_MODES:
        raise ValueError(
            f"{name('max_seq_len')}=None (no length cap) needs a length-free `{name('downsample')}`, one of "
            f"{LENGTH_FREE_MODES}; {downsample!r} holds weights for every level of a fixed length."
        )


__all__ = [
    "BOUNDARY_MODES",
    "CONFIG_FIELDS",
    "FMA_ATTN_IMPLEMENTATION",
    "QUERY_MODES",
    "check_fma_options",
    "fma_layer_options",
    "length_free",
    "sequence_cap",
]
