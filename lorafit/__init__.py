"""lorafit: fine-tune Hugging Face causal LMs with LoRA and QLoRA from YAML configs."""

__version__ = "0.1.0"
