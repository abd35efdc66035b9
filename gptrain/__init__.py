"""gptrain: pretrain GPT-2 and Llama-style language models on Project Gutenberg."""

__version__ = "0.1.0"
