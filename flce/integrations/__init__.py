"""Integrations of flce with model libraries.

Each submodule imports its library lazily, so importing flce never requires it:
  flce.integrations.transformers   Hugging Face transformers causal LMs (and PEFT adapters on them)
"""
