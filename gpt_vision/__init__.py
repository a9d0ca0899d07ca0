"""gpt_vision: generative pretraining of image transformers (Image-GPT) at scale."""

__version__ = "0.1.0"
