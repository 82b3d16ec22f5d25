"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`, `TrainingTesterMixin`) run on FMT.

Their sources come from the transformers sdist, fetched by `python tests/helpers/transformers_common.py` (part of
`make test`); deselect with `-m "not download"`.
"""

import pytest
from helpers import transformers_common

from fmt_hf import (
    FMTConfig,
    FMTForCausalLM,
    FMTForMaskedLM,
    FMTForQuestionAnswering,
    FMTForSequenceClassification,
    FMTForTokenClassification,
    FMTModel,
)

pytestmark = pytest.mark.download

_common = transformers_common.load()


if isinstance(_common, str):

    @pytest.mark.skip(reason=f"transformers' common model tests unavailable: {_common}")
    def test_transformers_common_tests():
        pass

else:
    import unittest

    from transformers.models.auto import modeling_auto

    class FMTModelTester:
        """Tiny FMT models and inputs in the shape transformers' common tests expect.

        `seq_length` (20) exceeds two FMA blocks (2 * 4), so FMA runs with coarse levels, not as dense attention;
        it also needs every level built for `max_position_embeddings` (32), so every downsampler gets a gradient.
        """

        causal_lm_class = FMTForCausalLM
        sequence_classification_class = FMTForSequenceClassification
        base_model_class = FMTModel

        def __init__(
            self,
            parent,
            batch_size=4,
            seq_length=20,
            is_training=True,
            vocab_size=99,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
            fma_block_size=4,
            fma_coarse_tokens=2,
            fma_downsample="depthwise",
            pad_token_id=0,
            num_labels=3,
            type_sequence_label_size=2,
        ):
            self.parent = parent
            self.batch_size, self.seq_length, self.is_training = batch_size, seq_length, is_training
            self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
            self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
            self.num_key_value_heads, self.max_position_embeddings = num_key_value_heads, max_position_embeddings
            self.fma_block_size, self.fma_coarse_tokens = fma_block_size, fma_coarse_tokens
            self.fma_downsample = fma_downsample
            self.pad_token_id = pad_token_id
            self.num_labels, self.type_sequence_label_size = num_labels, type_sequence_label_size

        def get_config(self) -> FMTConfig:
            return FMTConfig(
                vocab_size=self.vocab_size,
                hidden_size=self.hidden_size,
                intermediate_size=self.intermediate_size,
                num_hidden_layers=self.num_hidden_layers,
                num_attention_heads=self.num_attention_heads,
                num_key_value_heads=self.num_key_value_heads,
                max_position_embeddings=self.max_position_embeddings,
                fma_block_size=self.fma_block_size,
                fma_coarse_tokens=self.fma_coarse_tokens,
                fma_downsample=self.fma_downsample,
                pad_token_id=self.pad_token_id,
                num_labels=self.num_labels,
            )

        def prepare_config_and_inputs_for_common(self):
            input_ids = _common.ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
            attention_mask = _common.random_attention_mask([self.batch_size, self.seq_length])
            return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}

    class FMTCommonModelTest(_common.ModelTesterMixin, _common.TrainingTesterMixin, unittest.TestCase):
        all_model_classes = (
            FMTModel,
            FMTForCausalLM,
            FMTForMaskedLM,
            FMTForSequenceClassification,
            FMTForTokenClassification,
            FMTForQuestionAnswering,
        )
        # The generation suite (tests/generation/test_utils.py) is not in the sdist, and FMT has no KV cache yet:
        # `test_generate_recomputes_whole_sequence` above checks FMT's generate() instead.
        all_generative_model_classes = ()
        # The mixin dates models by a copyright line; FMT is new and its `_init_weights` covers every weight.
        test_can_init_all_missing_weights_before_2023 = True
        # The overfit batch must fit the tiny models' max_position_embeddings (the mixin's default is 64).
        training_overfit_seq_length = 32

        @classmethod
        def setUpClass(cls):
            # The mixins pick labels and expectations by looking model classes up in these name tables.
            cls._registered_names = [
                (modeling_auto.MODEL_MAPPING_NAMES, "FMTModel"),
                (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "FMTForCausalLM"),
                (modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES, "FMTForMaskedLM"),
                (modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES, "FMTForSequenceClassification"),
                (modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES, "FMTForTokenClassification"),
                (modeling_auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES, "FMTForQuestionAnswering"),
            ]
            for table, name in cls._registered_names:
                table["fmt"] = name

        @classmethod
        def tearDownClass(cls):
            for table, _ in cls._registered_names:
                table.pop("fmt", None)

        def setUp(self):
            # The rope-scaling test runs inputs of 1.5 x max_position_embeddings, which only a length-free FMA
            # hierarchy takes (docs/fma.md §7a).
            length_free = self._testMethodName.startswith("test_model_rope_scaling_from_config")
            self.model_tester = FMTModelTester(self, fma_downsample="recursive" if length_free else "depthwise")
            self.config_tester = _common.ConfigTester(
                self, config_class=FMTConfig, hidden_size=48, num_attention_heads=4
            )

        def test_config(self):
            self.config_tester.run_common_tests()

        @unittest.skip("FMA, not sdpa, is FMT's default; test_fma_is_the_default_and_dense_is_opt_in checks dispatch")
        def test_sdpa_can_dispatch_non_composite_models(self):
            pass
