"""Hugging Face checkpoints in and out: `jaxlm import` / `jaxlm export` and `init_from: hf:DIR`.

One module per family (gpt2, llama, bert) holds its tensor-name table and config translation;
`convert` the shared rule machinery, `safetensors_io` reading and writing the files.
"""

from jaxlm.hf import bert, gpt2, llama

FAMILIES = (gpt2.FAMILY, llama.FAMILY, bert.FAMILY)
