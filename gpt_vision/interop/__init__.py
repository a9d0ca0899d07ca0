"""Weight interchange with other implementations (HuggingFace ImageGPT)."""

from gpt_vision.interop.hf_imagegpt import export_hf_imagegpt, import_hf_imagegpt

__all__ = ["export_hf_imagegpt", "import_hf_imagegpt"]
