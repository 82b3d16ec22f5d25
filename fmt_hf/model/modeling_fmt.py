"""The Fast Multipole Transformer (FMT): a Llama-style decoder whose attention is Fast Multipole Attention.

Everything but the attention kernel follows `transformers.models.llama.modeling_llama` (pre-norm RMSNorm, rotary
embeddings, SwiGLU MLP, grouped-query attention), so Llama-family weights map onto FMT one to one and the same
weights run with dense attention for comparison.

Attention implementations (`config._attn_implementation`, chosen with `attn_implementation=` in `from_pretrained`,
`from_config` or `set_attn_implementation`):

- `"fma"` (the default): `FastMultipoleAttention`, O(n log n). Each row's hierarchy starts at its first real token
  (left padding is moved out of the way), other padding becomes FMA's key padding mask. With `use_cache` it keeps the
  multilevel coarse `FMTCache` (docs/fma.md §8): O(m + p log n) memory per layer, exact decoding.
- `"sdpa"`, `"eager"`: dense attention on the same projections and rotary embeddings, with the usual 4D masks and
  transformers' `DynamicCache`; the FMA downsamplers stay in the model (and in its checkpoints) but are not used.

This file and its siblings are also the Hub code of every saved checkpoint, so they import each other only with
single-dot relative imports (`save_pretrained` copies exactly those files into a flat folder).
"""

import copy
from collections.abc import Callable

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import (
    GenericForQuestionAnswering,
    GenericForSequenceClassification,
    GenericForTokenClassification,
    GradientCheckpointingLayer,
)
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    MaskedLMOutput,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import (
    ALL_ATTENTION_FUNCTIONS,
    PreTrainedModel,
    slice_logits_to_keep,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .attention_fmt import eager_attention_forward
from .auto_fmt import FMT_MODEL_CLASSES, make_base_model_resolvable, register_for_auto_classes
from .cache_fmt import is_fmt_cache
from .configuration_fmt import FMTConfig
from .fma_attention import FastMultipoleAttention
from .fma_downsample import DepthwiseDownsample, FullDownsample, RecursiveDownsample
from .fma_masking import prepare_generation_cache, prepare_layer_inputs
from .fma_options import FMA_ATTN_IMPLEMENTATION, fma_layer_options, sequence_cap


class FMTRMSNorm(nn.Module):
    """Root-mean-square layer normalisation, computed in float32 (as `LlamaRMSNorm`)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class FMTRotaryEmbedding(nn.Module):
    """Rotary position embeddings as Llama's, from `config.rope_parameters`: returns `(cos, sin)` for given
    positions. The frequencies (and the cos/sin scaling of `"yarn"`) of every type but `"default"` come from
    transformers' own `ROPE_INIT_FUNCTIONS`; `"dynamic"` recomputes them for inputs longer than
    `max_position_embeddings` (transformers' `dynamic_rope_update`, as Llama)."""

    def __init__(self, config: FMTConfig):
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        # The length up to which the frequencies are the original ones (read by `dynamic_rope_update`).
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
        rope_init_fn = (
            self.compute_default_rope_parameters if self.rope_type == "default" else ROPE_INIT_FUNCTIONS[self.rope_type]
        )
        inv_freq, self.attention_scaling = rope_init_fn(config)
        # Not persistent: recomputed from the config, also by `_init_weights` after a meta-device `from_pretrained`.
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: FMTConfig, device=None, seq_len=None) -> tuple[torch.Tensor, float]:
        """`"default"`: inverse frequencies `1 / theta^(2i / head_dim)`, `i = 0 .. head_dim/2 - 1`, scaling 1."""
        exponents = torch.arange(0, config.head_dim, 2, dtype=torch.float, device=device) / config.head_dim
        return 1.0 / (config.rope_parameters["rope_theta"] ** exponents), 1.0

    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Angles in float32 whatever the model dtype: bf16 positions lose precision beyond a few hundred tokens.
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotates half the hidden dims of the input."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates `q`, `k` (batch, heads, seq_len, head_dim) by the angles in `cos`, `sin` (batch, seq_len, head_dim)."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


class FMTMLP(nn.Module):
    """SwiGLU feed-forward block: `down(act(gate(x)) * up(x))`."""

    def __init__(self, config: FMTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class FMTAttention(nn.Module):
    """Multi-head (grouped-query) self-attention: projections and rotary embeddings as in Llama, then FMA or a
    dense kernel according to `config._attn_implementation`.

    The layer owns its `FastMultipoleAttention` (and so its learned downsamplers) whatever the implementation, so
    every implementation runs on, and saves, the same weights.
    """

    def __init__(self, config: FMTConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        # Read by the dense kernels (sdpa's `is_causal` when no mask is materialised).
        self.is_causal = config.is_causal

        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)
        self.fma = FastMultipoleAttention(**fma_layer_options(config))

    @deprecate_kwarg("past_key_values", "6.0.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`attention_mask` is what `FMTModel` prepared for the implementation: the 2D key padding mask for FMA
        (rows already aligned to their first real token), a 4D mask (or None) for the dense kernels. `cache` is
        an `FMTCache` under FMA, any transformers cache (e.g. `DynamicCache`) for the dense kernels."""
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        # Rotary embeddings go on the fine keys, before FMA downsamples them: coarse keys are learned mixtures of
        # rotated keys, so relative positions survive into every level.
        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if is_fmt_cache(cache):
            attn_output = cache.attend(
                self.layer_idx,
                self.fma,
                query_states,
                key_states,
                value_states,
                attention_mask,
                kwargs.get("fma_lengths"),
            )
            return self.o_proj(attn_output.transpose(1, 2).reshape(*input_shape, -1)), None
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )

        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.o_proj(attn_output)
        return attn_output, attn_weights


class FMTDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""

    def __init__(self, config: FMTConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = FMTAttention(config=config, layer_idx=layer_idx)
        self.mlp = FMTMLP(config)
        self.input_layernorm = FMTRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = FMTRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @deprecate_kwarg("past_key_values", "6.0.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


class FMTPreTrainedModel(PreTrainedModel):
    """Weight initialisation, attention-implementation defaults and loading hooks shared by all FMT models."""

    config: FMTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["FMTDecoderLayer"]
    _supports_sdpa = True
    # vLLM's and SGLang's Transformers backends take a model only when this is True (`is_backend_compatible`), and
    # then swap its attention for their dense paged kernel: wrong outputs for FMA weights, and no memory saving.
    _supports_attention_backend = False
    _can_record_outputs = {
        "hidden_states": FMTDecoderLayer,
        "attentions": FMTAttention,
    }

    @property
    def max_sequence_length(self) -> int | None:
        """The longest sequence (cached tokens included) this model accepts, or None when nothing caps it
        (:func:`sequence_cap` of its config and attention implementation)."""
        return sequence_cap(self.config, self.config._attn_implementation)

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        # FMA is this architecture's attention, so it is what "no preference" means; transformers' own default
        # would be sdpa. The dense implementations stay available on request.
        if requested_attention is None:
            return FMA_ATTN_IMPLEMENTATION
        return super().get_correct_attn_implementation(requested_attention, is_init_check)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # the rotary buffers too (transformers recognises `FMTRotaryEmbedding`)
        if isinstance(module, (DepthwiseDownsample, FullDownsample, RecursiveDownsample)):
            # FMA's own average init (fma.md §2) rather than a random draw, so that an untrained level summarises
            # its groups by sub-window means. Levels loaded from a checkpoint are kept: a model extended to a longer
            # max_position_embeddings initialises only its new levels.
            loaded = {
                name: parameter.detach().clone()
                for name, parameter in module.named_parameters()
                if getattr(parameter, "_is_hf_initialized", False)
            }
            if len(loaded) < len(list(module.parameters())):
                module.reset_parameters()
                for name, value in loaded.items():
                    module.get_parameter(name).copy_(value)


class FMTModel(FMTPreTrainedModel):
    """The bare FMT decoder stack: embeddings, `num_hidden_layers` decoder layers, final RMSNorm. Causal or
    bidirectional according to `config.is_causal`."""

    def __init__(self, config: FMTConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size

        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [FMTDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = FMTRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = FMTRotaryEmbedding(config=config)
        self.gradient_checkpointing = False

        self.post_init()

    @deprecate_kwarg("past_key_values", "6.0.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`):
                Token ids; give either these or `inputs_embeds`. Cached plus new tokens may not exceed
                `max_sequence_length` (see `FMTConfig.max_position_embeddings`).
            attention_mask (`torch.Tensor` of shape `(batch_size, seq_len)`, *optional*):
                1 for real tokens, 0 for padding. Padding is never attended to; the outputs at padded positions
                are meaningless. Under FMA, a padded row gives its real tokens the same outputs as the unpadded
                sequence; only 2D masks are accepted (the dense implementations also take prepared 4D masks).
            position_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`, *optional*):
                Positions for the rotary embeddings; default `past .. past + seq_len - 1` with `past` the cached
                length (padding included: with left padding and a cache, pass them, as `generate` does).
            cache (`Cache`, *optional*):
                Keys and values of earlier tokens: an `FMTCache` under FMA (built here when `use_cache` and none is
                given), any transformers cache such as `DynamicCache` under `sdpa`/`eager`. Causal models only.
            inputs_embeds (`torch.Tensor` of shape `(batch_size, seq_len, hidden_size)`, *optional*):
                Input embeddings instead of `input_ids`.
            use_cache (`bool`, *optional*):
                Return the cache (causal models; defaults to `config.use_cache`).
            output_hidden_states (`bool`, *optional*):
                Also return the input of every layer and the final (normed) output. Under FMA, with left padding,
                the per-layer states are in the aligned layout (each row's first real token at index 0); only
                `last_hidden_state` and the logits are shifted back to the input's layout.
            output_attentions (`bool`, *optional*):
                Also return the attention weights: `eager` only (under FMA a ValueError: FMA forms no such matrix).
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        build_cache, output_attentions = use_cache and not self.training, kwargs.get("output_attentions")
        inputs = prepare_layer_inputs(
            self.config, inputs_embeds, attention_mask, position_ids, cache, build_cache, output_attentions
        )
        if inputs.fma_lengths is not None:
            kwargs["fma_lengths"] = inputs.fma_lengths

        hidden_states = inputs.inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=inputs.position_ids)
        for decoder_layer in self.layers:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=inputs.attention_mask,
                position_embeddings=position_embeddings,
                position_ids=inputs.position_ids,
                cache=inputs.cache,
                use_cache=use_cache,
                **kwargs,
            )
        hidden_states = inputs.restore(self.norm(hidden_states))
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=inputs.cache if use_cache else None)


class FMTLanguageModel(FMTPreTrainedModel):
    """The FMT stack with a language-modelling head (tied to the input embeddings when configured): the shared
    part of `FMTForCausalLM` and `FMTForMaskedLM`, which differ in causality and in their outputs."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _causal: bool  # the attention this head needs, forced onto (a copy of) the config

    def __init__(self, config: FMTConfig):
        if config.is_causal != self._causal:  # a copy: the caller's config may be shared with models of the other kind
            config = copy.deepcopy(config)
            config.is_causal = self._causal
        super().__init__(config)
        self.model = FMTModel(self.config)
        self.vocab_size = self.config.vocab_size
        self.lm_head = nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False)

        self.post_init()

    def _language_model_forward(
        self, labels: torch.LongTensor | None, logits_to_keep: int | torch.Tensor, model_inputs: dict, **kwargs
    ) -> CausalLMOutputWithPast | MaskedLMOutput:
        """The stack on `model_inputs`, the head on its last `logits_to_keep` positions, and the loss (the head's
        own: shifted for causal LM, not for masked LM)."""
        outputs: BaseModelOutputWithPast = self.model(**model_inputs, **kwargs)
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            # kwargs carry the Trainer's num_items_in_batch: gradient accumulation normalises by it
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        output_class, extra = (
            (CausalLMOutputWithPast, {"cache": outputs.cache}) if self._causal else (MaskedLMOutput, {})
        )
        return output_class(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions, **extra
        )


class FMTForCausalLM(FMTLanguageModel, GenerationMixin):
    """FMT with a language-modelling head for next-token prediction; always causal (`config.is_causal=True`)."""

    _causal = True

    @deprecate_kwarg("past_key_values", "6.0.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        r"""
        Arguments as `FMTModel.forward`, plus:

            labels (`torch.LongTensor` of shape `(batch_size, seq_len)`, *optional*):
                Next-token targets aligned with `input_ids` (shifted inside the loss); -100 is ignored.
            logits_to_keep (`int` or `torch.Tensor`, *optional*, defaults to 0):
                Compute logits only for the last `logits_to_keep` positions (0: all), or for the given indices.

        Example:

        ```python
        >>> import torch
        >>> from fmt_hf import FMTConfig, FMTForCausalLM

        >>> config = FMTConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
        >>> model = FMTForCausalLM(config)
        >>> input_ids = torch.randint(0, 100, (1, 16))
        >>> out = model(input_ids, labels=input_ids)
        >>> out.logits.shape
        torch.Size([1, 16, 100])
        ```"""
        model_inputs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        return self._language_model_forward(labels, logits_to_keep, model_inputs, **kwargs)

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs: dict, generation_mode, batch_size: int, max_cache_length: int
    ) -> None:
        # Under FMA `generate` keeps an FMTCache; the dense implementations use transformers' caches.
        if not prepare_generation_cache(
            self.config, generation_config, model_kwargs, generation_mode, max_cache_length
        ):
            super()._prepare_cache_for_generation(
                generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
            )

    def init_continuous_batching(self, *args, **kwargs):
        """Refused, with every way into continuous batching (`generate_batch`, `cache_implementation="paged"`,
        `transformers serve --continuous-batching`), which all start here."""
        raise NotImplementedError(
            "FMT cannot use continuous batching: its paged cache holds only full and sliding-window attention layers, "
            "and FMT's multilevel FMTCache keeps coarse summaries that no paged block can hold. Batch prompts through "
            "generate() (left padding), and serve with fmt-serve without --continuous-batching."
        )


class FMTForMaskedLM(FMTLanguageModel):
    """FMT with a language-modelling head for masked-token prediction; always bidirectional
    (`config.is_causal=False`), padding masks honoured."""

    _causal = False

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MaskedLMOutput:
        r"""
        Arguments as `FMTModel.forward` (no cache), plus:

            labels (`torch.LongTensor` of shape `(batch_size, seq_len)`, *optional*):
                Targets at the masked positions, -100 elsewhere (not shifted).
        """
        model_inputs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
        )
        return self._language_model_forward(labels, 0, model_inputs, **kwargs)


class FMTGenericHead:
    """What FMT adds to transformers' generic heads (`GenericForSequenceClassification` and its siblings, as Llama
    uses them): a `ValueError` naming `num_labels` when a classifier is asked for no classes, and a base model that
    `AutoModel.from_config` -- which the generic heads build their stack with -- can find, also as Hub code
    (`make_base_model_resolvable`)."""

    _needs_labels: bool = False  # classifiers need `num_labels >= 1`

    def __init__(self, config: FMTConfig):
        if self._needs_labels and config.num_labels < 1:
            raise ValueError(
                f"{type(self).__name__} needs `num_labels` >= 1 (the number of classes, or 1 for regression), got "
                f"{config.num_labels}."
            )
        make_base_model_resolvable(type(config), FMTModel)
        super().__init__(config)


class FMTForSequenceClassification(FMTGenericHead, GenericForSequenceClassification, FMTPreTrainedModel):
    """FMT with a linear head (`score`, `config.num_labels` outputs; one output means regression) on one vector per
    sequence, e.g. a long document. The vector follows the attention of the config (`config.is_causal`):

    - **causal** (a causal LM checkpoint): each row's last real token, the only one that has read the whole
      sequence, found as the rightmost token that is not `config.pad_token_id` (transformers'
      `GenericForSequenceClassification`, as Llama; left and right padding alike). Without a `pad_token_id`, only
      batches of one sequence can be classified.
    - **bidirectional** (a masked LM checkpoint): the mean of the final hidden states over the real tokens
      (`attention_mask`; without one, the tokens that are not `pad_token_id`). Every token has read the whole
      sequence and none was trained as a summary (FMT's masked LM has no `[CLS]` token), so all of them vote.

    The loss follows `config.problem_type` as in every transformers classifier (regression, single- or
    multi-label classification).
    """

    _needs_labels = True

    @deprecate_kwarg("past_key_values", "6.0.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SequenceClassifierOutputWithPast:
        r"""
        Arguments as `FMTModel.forward`, plus:

            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Class indices in `[0, config.num_labels)`, or float targets for regression (`num_labels == 1`) and
                multi-label classification (`(batch_size, num_labels)`).

        Returns `logits` of shape `(batch_size, config.num_labels)`.
        """
        inputs = dict(
            attention_mask=attention_mask, position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds
        )
        if self.config.is_causal:
            batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
            if self.config.pad_token_id is None and batch_size > 1:
                raise ValueError(
                    f"{type(self).__name__} reads a causal model at each row's last real token, which it finds by "
                    f"`pad_token_id`; the config has none, so batches of {batch_size} sequences cannot be classified. "
                    "Set `config.pad_token_id` (e.g. to the tokenizer's pad token id) or classify one sequence at a "
                    "time."
                )
            return super().forward(input_ids, labels=labels, use_cache=use_cache, **inputs, **kwargs)
        outputs: BaseModelOutputWithPast = self.model(input_ids, use_cache=False, **inputs, **kwargs)
        hidden_states = outputs.last_hidden_state
        if attention_mask is not None:
            real = attention_mask.to(hidden_states.device, torch.bool)
        elif input_ids is not None and self.config.pad_token_id is not None:
            real = (input_ids != self.config.pad_token_id).to(hidden_states.device)
        else:
            real = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
        weights = real.to(hidden_states.dtype).unsqueeze(-1)
        pooled = (hidden_states * weights).sum(1) / weights.sum(1).clamp(min=1)
        logits = self.score(pooled)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=logits, config=self.config)
        return SequenceClassifierOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class FMTForTokenClassification(FMTGenericHead, GenericForTokenClassification, FMTPreTrainedModel):
    """FMT with a linear head on every token (`config.num_labels` classes; transformers'
    `GenericForTokenClassification`, dropout `config.classifier_dropout`, default 0.1). With a bidirectional config
    (a masked LM checkpoint) each token's label reads the whole document; with a causal one, the text up to it."""

    _needs_labels = True


class FMTForQuestionAnswering(FMTGenericHead, GenericForQuestionAnswering, FMTPreTrainedModel):
    """FMT with extractive question-answering heads (`qa_outputs`: span start and end logits per token;
    transformers' `GenericForQuestionAnswering`). A bidirectional config (a masked LM checkpoint) lets every
    position read the question and the whole context."""


# Saving any of these classes copies this file and its relative imports next to the weights (Hub custom code).
register_for_auto_classes(globals())

__all__ = ["FMTPreTrainedModel", *FMT_MODEL_CLASSES.values()]
