"""Configuration of the Fast Multipole Transformer (FMT)."""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

from .auto_fmt import FMT_AUTO_MAP
from .fma_downsample import DOWNSAMPLE_MODES
from .fma_flex import KERNELS
from .fma_options import BOUNDARY_MODES, CONFIG_FIELDS, QUERY_MODES, check_fma_options, fma_layer_options

FMT_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
"""The `rope_parameters["rope_type"]` values FMT supports. `"dynamic"` (NTK scaling) recomputes the frequencies
from the longest position of each forward call, as Llama does: keys already cached -- and the coarse summaries built
from them -- keep the rotation they were made with, as in Llama's cache. `"longrope"` is not supported."""


@strict
class FMTConfig(PreTrainedConfig):
    r"""
    Configuration of a Fast Multipole Transformer: a Llama-style decoder stack (pre-norm RMSNorm, rotary position
    embeddings, SwiGLU MLP, grouped-query attention) whose attention is Fast Multipole Attention (FMA,
    `fmt_hf.FastMultipoleAttention`). The field names follow `LlamaConfig` so that Llama-family weights map
    onto FMT one to one.

    Invalid values raise at construction (and again at `save_pretrained`) with a message naming the field.

    Args:
        vocab_size (`int`, *optional*, defaults to 32000):
            Number of tokens in the vocabulary.
        hidden_size (`int`, *optional*, defaults to 512):
            Width of the residual stream.
        intermediate_size (`int`, *optional*, defaults to 1408):
            Width of the SwiGLU MLP.
        num_hidden_layers (`int`, *optional*, defaults to 6):
            Number of decoder layers.
        num_attention_heads (`int`, *optional*, defaults to 8):
            Number of query heads per layer.
        num_key_value_heads (`int`, *optional*):
            Number of key/value heads (grouped-query attention); must divide `num_attention_heads`. Defaults to
            `num_attention_heads` (multi-head attention).
        head_dim (`int`, *optional*):
            Size of each head; must be even (rotary embeddings rotate pairs). Defaults to
            `hidden_size // num_attention_heads` (`hidden_size` must be divisible by `num_attention_heads` in
            any case, as in `LlamaConfig`).
        max_position_embeddings (`int`, *optional*, defaults to 2048):
            The training length. Under FMA with `fma_downsample` `"depthwise"` or `"full"`, or with
            `fma_boundary="zero_sink"`, also the longest sequence the model accepts (longer inputs raise a
            `ValueError`): the FMA hierarchy is built for it, rounded up to the next `fma_block_size * 2**(L+1)`.
            The length-free downsamplers, `"recursive"` and `"avgpool"` (with `fma_boundary="mask"`), and the dense
            implementations take any length: longer inputs run and `generate` continues past it. Beyond the
            training length a model still runs, but nothing guarantees its quality there: queries meet rotary
            distances training never showed, and the length-free downsamplers build levels training never used
            (`"recursive"` applies its shared map more times in a row). Measure quality at the lengths you use
            (e.g. `scripts/eval_lm.py --context_length`).
        rope_theta (`float`, *optional*, defaults to 10000.0):
            Base period of the rotary position embeddings: the same number as `rope_parameters["rope_theta"]`
            (give either; given both, they must agree).
        rope_parameters (`dict`, *optional*):
            Rotary position embeddings in the transformers-5 form of `LlamaConfig`: `rope_theta` and `rope_type`,
            one of `"default"` (the default), `"linear"`, `"dynamic"`, `"llama3"`, `"yarn"` (`FMT_ROPE_TYPES`),
            with the keys that type needs (e.g.
            `factor`, `low_freq_factor`, `high_freq_factor`, `original_max_position_embeddings` for `"llama3"`).
            The frequencies come from transformers' own `ROPE_INIT_FUNCTIONS`. A legacy `rope_scaling=` is read
            as `rope_parameters`.
        rms_norm_eps (`float`, *optional*, defaults to 1e-06):
            Epsilon of the RMS normalisation layers.
        hidden_act (`str`, *optional*, defaults to `"silu"`):
            Activation of the gated MLP (any key of `transformers.activations.ACT2FN`).
        attention_bias (`bool`, *optional*, defaults to `False`):
            Whether the query, key, value and output projections have biases (as in `LlamaConfig`).
        mlp_bias (`bool`, *optional*, defaults to `False`):
            Whether the gate, up and down projections of the MLP have biases (as in `LlamaConfig`).
        attention_dropout (`float`, *optional*, defaults to 0.0):
            Dropout probability on the attention probabilities, applied in training mode only.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of linear and embedding weights. The FMA downsamplers
            are not drawn from it: they start as sub-window averages.
        tie_word_embeddings (`bool`, *optional*, defaults to `False`):
            Whether the language-modelling head shares its weight with the input embeddings.
        use_cache (`bool`, *optional*, defaults to `True`):
            Whether the model returns a key/value cache for incremental decoding.
        pad_token_id (`int`, *optional*):
            Padding token id; its embedding row starts at zero.
        bos_token_id (`int`, *optional*, defaults to 1):
            Beginning-of-sequence token id.
        eos_token_id (`int` or `list[int]`, *optional*, defaults to 2):
            End-of-sequence token id(s).
        is_causal (`bool`, *optional*, defaults to `True`):
            Causal (autoregressive) or bidirectional attention, for FMA and for the dense implementations alike.
            `FMTForCausalLM` always sets it to `True` and `FMTForMaskedLM` to `False` in the configuration it
            keeps, so a saved checkpoint records the mode it was trained in and `AutoModel` reopens an MLM
            checkpoint as a bidirectional `FMTModel`. The FMA partition is fixed when a model is built: a
            per-call `is_causal` that disagrees with it is an error under FMA (the dense implementations honour it).
        fma_block_size (`int`, *optional*, defaults to 64):
            FMA's finest block `m`: each query attends the keys of its own and neighbouring blocks exactly. FMA
            equals dense attention for sequences of at most `(fma_near_blocks + 1) * fma_block_size` tokens.
        fma_coarse_tokens (`int`, *optional*, defaults to 4):
            FMA's `p`, the summaries each group is downsampled to at every coarse level; must divide (so be at
            most) `fma_block_size`.
        fma_downsample (`str`, *optional*, defaults to `"depthwise"`):
            How groups are summarised: `"depthwise"` (learned per-channel convolution), `"full"` (learned, with
            channel mixing), `"avgpool"` (fixed averages, no parameters) or `"recursive"` (learned; level 1 as
            `"depthwise"`, every higher level one shared map of its two halves' summaries, docs/fma.md §7a).
            `"depthwise"` and `"full"` hold weights for every level, so their count grows linearly with
            `max_position_embeddings`: per layer, K and V together, about `fma_coarse_tokens * head_dim * C` for
            `"depthwise"` and `head_dim` times that for `"full"`, where `C` is `max_position_embeddings` rounded
            up to `fma_block_size * 2**k` -- e.g. 4 * 128 * 65536 = 33.5M weights per layer at 64K context with
            `"depthwise"`. `"recursive"` has, for K and for V, `p*d*m + p*d` (level 1) plus `p*d*2p + p*d` (the
            shared map) with `p = fma_coarse_tokens`, `d = head_dim`, `m = fma_block_size`, independent of
            `max_position_embeddings` (2 * 4 * 64 * (64 + 1 + 8 + 1) = 37,888 per layer at d = 64, m = 64, p = 4).
            Which of them cap the length: see `max_position_embeddings`. All start as sub-window averages (an
            untrained `"recursive"` equals `"avgpool"`).
            With a dense `attn_implementation` they are kept but unused.
        fma_query_mode (`str`, *optional*, defaults to `"fine"`):
            `"fine"`: every query attends its coarse slots, O(n log n). `"coarse"`: one query per coarse-key
            resolution at each level, O(n).
        fma_scale_attn (`bool`, *optional*, defaults to `True`):
            Add `log(w / p)` to a coarse logit so that each summary weighs as the `w / p` tokens it stands for.
        fma_boundary (`str`, *optional*, defaults to `"mask"`):
            `"mask"` drops coarse slots outside the sequence; `"zero_sink"` gives them a zero key and value with
            logit 0 like the authors' released kernels (to reproduce published numbers only).
        fma_kernel (`str`, *optional*, defaults to `"auto"`):
            How FMA's fine queries are computed; the function is the same. `"gather"`: each fine block's key set is
            gathered and all blocks go through one SDPA call (every option, every device, float32 softmax).
            `"flex"`: one PyTorch FlexAttention call reading the key bank in place through a block mask (compiled on
            CUDA, eager and slow elsewhere; needs `fma_query_mode="fine"` and `fma_boundary="mask"`; bf16/fp16
            inputs stay in their dtype; training with `attention_dropout > 0` falls back to `"gather"`). `"auto"`:
            `"gather"`; `"flex"` only on the device kinds where it has been checked (`FLEX_VERIFIED_DEVICES` in
            `fma_attention.py`: none yet, so `"flex"` is opt-in until a GPU run of `scripts/check_gpu.py` passes).
        fma_sink_tokens (`int`, *optional*, defaults to 0):
            FMA's sink tokens `s` (`0 <= s <= fma_block_size`, docs/fma.md §3a): every query whose level-0 band
            misses the first `s` positions also attends them exactly, and the coarse summaries leave them out.
            Pretrained models park much of their attention on the first token (an attention sink), which plain FMA would
            average into distant summaries; a converted Llama-family model wants `s >= 1`. The decoding cache keeps
            `s` more keys and values per layer and key/value head. 0: plain FMA.
        fma_near_blocks (`int`, *optional*, defaults to 1):
            FMA's near-field width `w >= 1` (docs/fma.md §3): a query attends its own block and the `w` blocks
            before it exactly (bidirectional: and the `w` after it), and every coarse level keeps a near field of
            `w` groups on either side, so a level reads `w + 1` groups (bidirectional `2w + 1`). Wider fields see
            more of the context exactly: `(w + 1) * fma_block_size` fine keys per query, and as many fine keys and
            values in the decoding cache. 1: the partition of the paper's kernels.
        fma_refine_groups (`int`, *optional*, defaults to 0):
            FMA's adaptive refinement `k >= 0` (docs/fma.md §3c): each query also reads exactly the `k` far fine
            blocks whose keys may match it best (Quest's per-channel bound), every coarse summary holding one split
            into its children down to the block. For retrieval from the far field. The decoding cache then keeps a
            store of every past key and value (reported apart), of which a step reads `k * fma_block_size` fine keys
            more, as every query of the forward pass does. Needs `fma_query_mode="fine"` and `fma_boundary="mask"`.
            0: pure FMA.

    Example:

    ```python
    >>> from fmt_hf import FMTConfig, FMTForCausalLM

    >>> config = FMTConfig(hidden_size=256, num_hidden_layers=4, max_position_embeddings=4096)
    >>> model = FMTForCausalLM(config)
    ```"""

    model_type = "fmt"

    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1408
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rope_theta: float | int | None = None
    rope_parameters: RopeParameters | dict | None = None
    rms_norm_eps: float | int = 1e-6
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float | int = 0.0
    initializer_range: float | int = 0.02
    tie_word_embeddings: bool = False
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    is_causal: bool = True
    fma_block_size: int = 64
    fma_coarse_tokens: int = 4
    fma_downsample: Literal[DOWNSAMPLE_MODES] = "depthwise"
    fma_query_mode: Literal[QUERY_MODES] = "fine"
    fma_scale_attn: bool = True
    fma_boundary: Literal[BOUNDARY_MODES] = "mask"
    fma_kernel: Literal[KERNELS] = "auto"
    fma_sink_tokens: int = 0
    fma_near_blocks: int = 1
    fma_refine_groups: int = 0

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.rope_theta is None:
            # From `rope_parameters` when that has it; transformers' standardisation (below) copies it the other way.
            rope_parameters = self.rope_parameters or kwargs.get("rope_scaling") or {}
            self.rope_theta = rope_parameters.get("rope_theta", self.default_theta)
        super().__post_init__(**kwargs)
        self.auto_map = {**(getattr(self, "auto_map", None) or {}), **FMT_AUTO_MAP}

    def validate_sizes(self):
        """Part of `@strict` validation: sizes are positive and fit together, then FMA's options (the rules
        `FastMultipoleAttention` applies to its arguments, here naming the config's fields)."""
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)}.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads})."
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must be divisible by `num_key_value_heads` "
                f"({self.num_key_value_heads})."
            )
        if self.rms_norm_eps <= 0:
            raise ValueError(f"`rms_norm_eps` must be positive, got {self.rms_norm_eps}.")
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"`hidden_act` {self.hidden_act!r} is not a known activation; use one of {list(ACT2FN)}.")
        check_fma_options(**fma_layer_options(self), names=CONFIG_FIELDS)
        if self.head_dim % 2 != 0:
            raise ValueError(f"`head_dim` must be even for rotary embeddings, got {self.head_dim}.")

    def validate_rope(self):
        """Part of `@strict` validation: the rotary embeddings are of a type FMT supports and well defined."""
        rope_type = self.rope_parameters.get("rope_type")
        if rope_type not in FMT_ROPE_TYPES:
            raise ValueError(
                f"`rope_parameters['rope_type']` {rope_type!r} is not supported by FMT; use one of {FMT_ROPE_TYPES}."
            )
        # transformers' check of the keys each type needs (its `validate_rope` would also test the head size,
        # before `validate_sizes` can name the field that makes it odd)
        check_keys = getattr(self, f"_validate_{rope_type}_rope_parameters")
        check_keys(self.rope_parameters, ignore_keys=self.ignore_keys_at_rope_validation)
        if self.rope_parameters["rope_theta"] != self.rope_theta:
            raise ValueError(
                f"`rope_theta` ({self.rope_theta}) and `rope_parameters['rope_theta']` "
                f"({self.rope_parameters['rope_theta']}) disagree; give one of them."
            )
        if not self.rope_theta > 0:
            raise ValueError(f"`rope_theta` must be positive, got {self.rope_theta}.")
        if self.rope_parameters.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(
                "`rope_parameters['partial_rotary_factor']` must be 1.0 (FMT rotates whole heads, as Llama), got "
                f"{self.rope_parameters['partial_rotary_factor']}."
            )


# Saving the config copies this file next to it (Hub custom code), as saving a model does with modeling_fmt.py.
FMTConfig.register_for_auto_class()

__all__ = ["FMTConfig"]
