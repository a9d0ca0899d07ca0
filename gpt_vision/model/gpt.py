"""Image GPT: a decoder-only, pre-norm transformer over pixel tokens (or pixel patches).

Faithful to iGPT: gain-only RMS norm (LayerNorm selectable), learned position embeddings, a learned
start-of-sequence vector, GELU MLP of 4x width, untied output head, biases on every linear (so
HuggingFace ImageGPT weights map one to one). Attention goes through
`F.scaled_dot_product_attention`, so CUDA picks flash / memory-efficient kernels.

Inputs by objective (`config.objective`):
- next_pixel: tokens [B, L]; the model sees [SOS, t0 .. t(L-2)] and output i predicts t_i.
- masked_pixel: tokens [B, L] and a bool mask [B, L]; masked positions get a learned mask vector.
- next_patch: float patches [B, N, patch_dim]; shifted like next_pixel, output i predicts patch i.
"""

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gpt_vision.errors import ConfigError
from gpt_vision.model.config import ModelConfig

NORM_EPS = 1e-5  # HF ImageGPTConfig.layer_norm_epsilon default

Attention = Literal["causal", "bidirectional", "prefix"]


class RMSNorm(nn.Module):
    """iGPT's norm: x / sqrt(mean(x^2) + eps) * gain, no centring and no bias."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, NORM_EPS)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rms":
        return RMSNorm(cfg.n_embd)
    return nn.LayerNorm(cfg.n_embd, eps=NORM_EPS)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x), written as silu(1.702 x) / 1.702 to use silu's fused forward/backward kernels."""
    return F.silu(x * 1.702) * (1 / 1.702)


class KVCache:
    """Preallocated keys/values per layer for incremental decoding."""

    def __init__(self, n_layer: int):
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int, capacity: int):
        """Write k/v [B, H, T, D] at positions start..start+T; return all keys/values so far."""
        if self.keys[layer] is None:
            shape = (k.shape[0], k.shape[1], capacity, k.shape[3])
            self.keys[layer] = k.new_empty(shape)
            self.values[layer] = v.new_empty(shape)
        end = start + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # fused q, k, v
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | str | None, cache=None) -> torch.Tensor:
        """mask: "causal", None (full), or a bool tensor broadcastable to [B, H, T, S] (True = may attend)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if cache is not None:
            kv_cache, layer, start, capacity = cache
            k, v = kv_cache.update(layer, k, v, start, capacity)
        dropout = self.dropout if self.training else 0.0
        if isinstance(mask, str):
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.activation = quick_gelu if cfg.activation == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.activation(self.c_fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block; the unit for activation checkpointing and FSDP sharding."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = SelfAttention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | str | None, cache=None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x), mask, cache))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        d = cfg.n_embd
        if cfg.objective == "next_patch":
            self.patch_embed = nn.Linear(cfg.patch_dim, d)
        else:
            self.wte = nn.Embedding(cfg.vocab_size, d)
        if cfg.objective == "masked_pixel":
            self.mask_token = nn.Parameter(torch.empty(d))
        else:
            self.sos = nn.Parameter(torch.empty(d))
        self.wpe = nn.Embedding(cfg.seq_len, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = make_norm(cfg)
        out_dim = cfg.patch_dim if cfg.objective == "next_patch" else cfg.vocab_size
        self.head = nn.Linear(d, out_dim, bias=cfg.objective == "next_patch")
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, init_std), residual projections scaled by 1/sqrt(2 n_layer), zero biases."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif ".ln_" in name or name.startswith("ln_"):
                nn.init.ones_(p)
            elif name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, std=std)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """All parameters; with non_embedding, without the lookup tables (tokens, positions, SOS, mask).

        The untied head and the patch embedding are matmuls, so they count as non-embedding.
        """
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            lookups = [self.wpe.weight] + [getattr(self, n) for n in ("sos", "mask_token") if hasattr(self, n)]
            if hasattr(self, "wte"):
                lookups.append(self.wte.weight)
            total -= sum(p.numel() for p in lookups)
        return total

    # ---- inputs -------------------------------------------------------------------------------

    def _embed(self, inputs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Input vectors [B, L, d] before positions: shifted behind SOS, or masked (masked_pixel)."""
        cfg = self.config
        if cfg.objective == "masked_pixel":
            if mask is None:
                raise ValueError("masked_pixel model needs a bool mask [B, L] of the masked positions")
            x = self.wte(inputs)
            return torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        if mask is not None:
            raise ValueError(f"a mask is only used by the masked_pixel objective, not {cfg.objective}")
        body = inputs[:, :-1]
        x = self.patch_embed(body) if cfg.objective == "next_patch" else self.wte(body)
        sos = self.sos.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([sos, x], dim=1)

    def _positions(self, start: int, length: int, like: torch.Tensor) -> torch.Tensor:
        """Position embeddings through wpe's forward, so ZeRO-3 / FSDP hooks gather its weight."""
        return self.wpe(torch.arange(start, start + length, device=like.device)).to(like.dtype)

    def _attention_mask(self, attention: Attention, prefix_len: torch.Tensor | None, length: int, device):
        if attention == "causal":
            return "causal"
        if attention == "bidirectional":
            return None
        if attention != "prefix":
            raise ValueError(f"attention must be causal, bidirectional or prefix, got {attention!r}")
        if prefix_len is None:
            raise ValueError("prefix attention needs prefix_len [B]")
        pos = torch.arange(length, device=device)
        causal = pos[None, :] <= pos[:, None]  # [query, key]
        in_prefix = pos[None, None, :] < prefix_len.to(device)[:, None, None]  # [B, 1, key]
        return (causal[None] | in_prefix).unsqueeze(1)  # [B, 1, query, key]

    def _default_attention(self) -> Attention:
        return {"next_pixel": "causal", "masked_pixel": "bidirectional", "next_patch": "prefix"}[self.config.objective]

    # ---- forward ------------------------------------------------------------------------------

    def _blocks(self, x: torch.Tensor, mask, last: int | None = None, collect: set[int] | None = None):
        """Run blocks 0..last; returns the final hidden state and the collected {layer: output}."""
        collected = {}
        checkpointing = self.config.activation_checkpointing and self.training and torch.is_grad_enabled()
        last = len(self.blocks) - 1 if last is None else last
        for i in range(last + 1):
            block = self.blocks[i]
            x = checkpoint(block, x, mask, use_reentrant=False) if checkpointing else block(x, mask)
            if collect and i in collect:
                collected[i] = x
        return x, collected

    def forward(
        self,
        inputs: torch.Tensor,
        mask: torch.Tensor | None = None,
        attention: Attention | None = None,
        prefix_len: torch.Tensor | None = None,
        features: list[int] | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Logits [B, L, vocab] (token objectives) or patch predictions [B, N, patch_dim] (next_patch).

        attention defaults to the objective's own: causal (next_pixel), bidirectional (masked_pixel),
        prefix (next_patch: positions < prefix_len[b] see each other, later ones are causal).
        With `features` (block indices), returns `self.features(..., pool="none")` of those blocks
        instead: sharding wrappers (FSDP, ZeRO-3) gather parameters only around a call of the module.
        """
        if features is not None:
            return self.features(inputs, features, pool="none", attention=attention, mask=mask)
        x = self._embed(inputs, mask)
        L = x.shape[1]
        x = self.drop(x + self._positions(0, L, x))
        attn_mask = self._attention_mask(attention or self._default_attention(), prefix_len, L, x.device)
        x, _ = self._blocks(x, attn_mask)
        return self.head(self.ln_f(x))

    def features(
        self,
        inputs: torch.Tensor,
        layers: list[int],
        pool: Literal["mean", "none"] = "mean",
        attention: Literal["causal", "bidirectional"] | None = None,
        mask: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Hidden states for probes: for each i in `layers`, the output of block i (0-based, negative
        counts from the end), before the final norm; [B, d] with pool="mean" (average over positions,
        as iGPT's probes), [B, L, d] with pool="none". Blocks after the deepest requested one are not run.

        inputs as for forward (tokens, or patches for next_patch: see objectives.feature_inputs).
        attention defaults to causal for next_pixel, bidirectional for masked_pixel and next_patch.
        A masked_pixel model with mask=None sees every token.
        """
        n = len(self.blocks)
        wanted = [i + n if i < 0 else i for i in layers]
        if not wanted or any(not 0 <= i < n for i in wanted):
            raise ValueError(f"layers must be non-empty block indices in [-{n}, {n}), got {layers}")
        if pool not in ("mean", "none"):
            raise ValueError(f"pool must be 'mean' or 'none', got {pool!r}")
        if attention not in (None, "causal", "bidirectional"):
            raise ValueError(f"attention must be 'causal' or 'bidirectional', got {attention!r}")
        if self.config.objective == "masked_pixel" and mask is None:
            mask = torch.zeros(inputs.shape[:2], dtype=torch.bool, device=inputs.device)
        x = self._embed(inputs, mask)
        L = x.shape[1]
        x = x + self._positions(0, L, x)
        attention = attention or ("causal" if self.config.objective == "next_pixel" else "bidirectional")
        attn_mask = self._attention_mask(attention, None, L, x.device)
        _, collected = self._blocks(x, attn_mask, last=max(wanted), collect=set(wanted))
        return [collected[i].mean(dim=1) if pool == "mean" else collected[i] for i in wanted]

    # ---- sampling -----------------------------------------------------------------------------

    def _sample(self, logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
        """One token per row by inverse-CDF sampling, drawing exactly one uniform per row."""
        logits = logits.float() / max(temperature, 1e-8)
        if top_k is not None and top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)
        u = torch.rand(logits.shape[0], 1, generator=generator, device=generator.device if generator else "cpu")
        u = u.to(logits.device) * cdf[:, -1:]
        return torch.searchsorted(cdf, u).clamp_(max=logits.shape[-1] - 1).squeeze(1)

    @torch.no_grad()
    def generate(
        self,
        n_or_prompt: int | torch.Tensor,
        max_len: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Sample tokens [B, max_len] (default: the whole image) in raster order.

        n_or_prompt: a sample count (unconditional) or prompt tokens [B, P] to complete (e.g. the top
        half of an image, iGPT's completions); the prompt is returned as the first P tokens.
        use_cache=False recomputes the whole prefix at every step (a reference; same tokens).
        Decode tokens to pixels with the palette.
        """
        cfg = self.config
        if cfg.objective != "next_pixel":
            raise ValueError(f"generate needs a next_pixel model, this one is {cfg.objective}")
        max_len = cfg.seq_len if max_len is None else max_len
        if not 0 < max_len <= cfg.seq_len:
            raise ValueError(f"max_len must be in [1, {cfg.seq_len}], got {max_len}")
        device = self.wpe.weight.device
        if isinstance(n_or_prompt, int):
            tokens = torch.empty(n_or_prompt, 0, dtype=torch.long, device=device)
        else:
            tokens = n_or_prompt.to(device=device, dtype=torch.long)
        if tokens.shape[1] >= max_len:
            raise ValueError(f"prompt of {tokens.shape[1]} tokens leaves nothing to sample (max_len={max_len})")
        out = torch.empty(tokens.shape[0], max_len, dtype=torch.long, device=device)
        out[:, : tokens.shape[1]] = tokens
        cache = KVCache(len(self.blocks)) if use_cache else None
        pos = tokens.shape[1]
        new = torch.cat([self.sos.expand(out.shape[0], 1, -1), self.wte(tokens)], dim=1)  # SOS + prompt
        start = 0
        while pos < max_len:
            if cache is None:
                new = torch.cat([self.sos.expand(out.shape[0], 1, -1), self.wte(out[:, :pos])], dim=1)
                start = 0
            x = new + self._positions(start, new.shape[1], new)
            mask = self._decode_mask(start)
            for i, block in enumerate(self.blocks):
                x = block(x, mask, (cache, i, start, max_len) if cache is not None else None)
            logits = self.head(self.ln_f(x[:, -1]))
            out[:, pos] = self._sample(logits, temperature, top_k, generator)
            start += new.shape[1]
            if cache is not None:
                new = self.wte(out[:, pos : pos + 1])
            pos += 1
        return out

    @staticmethod
    def _decode_mask(start: int):
        """The prefill (SOS + prompt) is causal; after it, the single new query sees every cached key."""
        return "causal" if start == 0 else None


def build_model(cfg: ModelConfig) -> GPT:
    """The model for a resolved config, initialised on CPU in fp32 from torch's global RNG.

    Call `torch.manual_seed(seed)` first: the weights then depend on the seed alone, never on the
    device or parallel strategy, because the caller moves/shards the model after this returns.
    """
    cfg.check()
    for key in ("vocab_size", "image_size"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(key, f"must be > 0 to build the model, got {getattr(cfg, key)}")
    with torch.device("cpu"):
        return GPT(cfg.resolved())
