"""Model FLOPs per trained token, for MFU.

flops_per_token = 6 * N + 12 * n_layer * n_embd * seq_len

- 6 * N: forward (2 FLOPs per multiply-add) plus backward (twice the forward) for every weight that
  takes part in a matmul. N is the non-embedding parameter count (GPT.num_parameters(non_embedding=True)):
  blocks, final norm and the untied head (plus the patch embedding for next_patch); lookups
  (token/position embeddings, SOS, mask vector) cost no matmul FLOPs.
- 12 * n_layer * n_embd * seq_len: attention scores (Q K^T) and the weighted sum (A V), each
  2 * seq_len * n_embd FLOPs per token per layer forward, times 3 for forward + backward.
  We count the full square even for causal attention (as PaLM and nanoGPT do), so MFU figures are
  comparable across causal, prefix and bidirectional objectives; a causal kernel does about half of it.
"""

from gpt_vision.model.config import ModelConfig


def non_embedding_parameters(cfg: ModelConfig) -> int:
    """Closed form of GPT.num_parameters(non_embedding=True) for a resolved config."""
    d = cfg.n_embd
    norm = d if cfg.norm == "rms" else 2 * d
    block = (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + 2 * norm
    if cfg.objective == "next_patch":
        io = (cfg.patch_dim * d + d) + (d * cfg.patch_dim + cfg.patch_dim)
    else:
        io = d * cfg.vocab_size
    return cfg.n_layer * block + norm + io


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    cfg = cfg.resolved()
    return 6 * non_embedding_parameters(cfg) + 12 * cfg.n_layer * cfg.n_embd * seq_len
