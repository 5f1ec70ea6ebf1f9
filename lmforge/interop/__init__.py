"""Hugging Face interoperability: GPT-2, BERT and BART folders in and out, weights mapped exactly.

    from lmforge.interop import from_hf, to_hf
    model, tokenizer = from_hf("path/to/hf-folder")      # converted in memory
    to_hf(model, tokenizer, "path/to/new-hf-folder")      # loads with AutoModel...from_pretrained

One module per family (gpt2.py, bert.py, bart.py) declares its config fields and weight names;
mapping.py holds what they share; hf.py reads and writes the folders (lmforge/model_folder.py
converts folder to folder). Nothing here imports
`transformers`.
"""

from lmforge.interop.hf import from_hf, hf_task, is_hf_folder, to_hf

__all__ = ["from_hf", "hf_task", "is_hf_folder", "to_hf"]
