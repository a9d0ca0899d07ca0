"""Objectives: each overfits a fixed batch, no position sees what its mask forbids; bits per dim."""
import math
from dataclasses import replace

import pytest
import torch

from gpt_vision.model import ModelConfig, bits_per_dim, build_model, build_objective, patchify

SIDE, PALETTE = 8, 16


@pytest.fixture(autouse=True)
def one_thread():
    """Small models on a shared, loaded CPU run far faster on one thread than on contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(objective, **fields):
    return ModelConfig(
        n_layer=2, n_embd=64, n_head=4, vocab_size=PALETTE, image_size=SIDE, channels=3,
        objective=objective, patch_size=2, **fields,
    )


def fixed_batch(batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "tokens": torch.randint(0, PALETTE, (batch, SIDE * SIDE), generator=g),
        "pixels": torch.randint(0, 256, (batch, SIDE, SIDE, 3), generator=g, dtype=torch.uint8),
        "label": torch.zeros(batch, dtype=torch.long),
    }


class Wrapper(torch.nn.Module):
    """Stands in for DDP/FSDP/DeepSpeed: only forward is reachable; records the last output."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.last_output = None

    def forward(self, *args, **kwargs):
        self.last_output = self.module(*args, **kwargs)
        self.last_output.retain_grad()
        return self.last_output


@pytest.mark.parametrize("objective", ["next_pixel", "masked_pixel", "next_patch"])
def test_objective_overfits_a_fixed_batch(objective):
    torch.manual_seed(0)
    cfg = config(objective)
    model = Wrapper(build_model(cfg))
    loss_fn = build_objective(cfg)
    batch = fixed_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):  # same generator seed every step: the masks / prefixes are fixed too
        loss = loss_fn(model, batch, torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert loss.dim() == 0
        losses.append(loss.detach())
    first, last = losses[0].item(), sum(x.item() for x in losses[-5:]) / 5
    assert last < 0.1 * first, (first, last)


def embedding_grads(model, run):
    """Gradient of run(model)'s scalar w.r.t. the token embeddings the model looked up."""
    captured = {}

    def keep(module, args, out):
        out.retain_grad()
        captured["emb"] = out

    handle = model.wte.register_forward_hook(keep)
    run(model).backward()
    handle.remove()
    return captured["emb"].grad


def test_next_pixel_position_i_never_sees_token_i_or_later():
    torch.manual_seed(0)
    model = build_model(config("next_pixel"))
    tokens = fixed_batch()["tokens"]
    L = tokens.shape[1]
    for i in (0, 1, 17, L - 1):
        grad = embedding_grads(model, lambda m: torch.nn.functional.cross_entropy(m(tokens)[:, i], tokens[:, i]))
        # the embeddings hold t_0 .. t_(L-2) at input positions 1 .. L-1; entry k is token k
        assert grad.shape[1] == L - 1
        assert torch.count_nonzero(grad[:, i:]) == 0
        if i > 0:
            assert torch.count_nonzero(grad[:, :i].abs().sum(-1)) == grad.shape[0] * i


def test_masked_pixel_hides_the_identity_of_masked_tokens():
    torch.manual_seed(0)
    cfg = config("masked_pixel")
    model = build_model(cfg)
    tokens = fixed_batch()["tokens"]
    mask = build_objective(cfg).sample_mask(tuple(tokens.shape), torch.Generator().manual_seed(0))
    assert (mask.sum(1) == round(0.15 * SIDE * SIDE)).all()
    other = torch.where(mask, (tokens + 1) % PALETTE, tokens)
    with torch.no_grad():
        assert torch.equal(model(tokens, mask=mask), model(other, mask=mask))
    grad = embedding_grads(model, lambda m: torch.nn.functional.cross_entropy(m(tokens, mask=mask)[mask], tokens[mask]))
    assert torch.count_nonzero(grad[mask]) == 0
    assert torch.count_nonzero(grad[~mask].abs().sum(-1)) == (~mask).sum()  # bidirectional: every visible token counts


def test_prefix_attention_sees_the_prefix_and_is_causal_after_it():
    torch.manual_seed(0)
    cfg = config("next_patch")
    model = build_model(cfg)
    patches = patchify(fixed_batch(batch=2)["pixels"], 2).requires_grad_()
    N = patches.shape[1]
    prefix = torch.tensor([5, 9])
    for i in (0, 3, 9, 12, N - 1):
        patches.grad = None
        model(patches, attention="prefix", prefix_len=prefix)[:, i].sum().backward()
        seen = patches.grad.abs().sum(-1) > 0  # [B, N]: input patch j sits at position j + 1
        for b, p in enumerate(prefix.tolist()):
            visible = max(i, p - 1)  # positions <= max(i, p-1) hold patches < max(i, p-1)
            assert seen[b, :visible].all() and not seen[b, visible:].any(), (b, i)


def test_next_patch_loss_ignores_the_prefix_positions():
    torch.manual_seed(0)
    cfg = config("next_patch")
    model = Wrapper(build_model(cfg))
    objective = build_objective(cfg)
    loss = objective(model, fixed_batch(), torch.Generator().manual_seed(3))
    loss.backward()
    prefix = objective.sample_prefix(4, torch.Generator().manual_seed(3))
    scored = model.last_output.grad.abs().sum(-1) > 0
    positions = torch.arange(scored.shape[1])
    assert torch.equal(scored, positions[None, :] >= prefix[:, None])
    assert prefix.min() >= 1 and prefix.max() <= scored.shape[1] - 1


def test_random_choices_follow_the_generator():
    cfg = config("next_patch")
    prefixes = [build_objective(cfg).sample_prefix(64, torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(prefixes[0], prefixes[1]) and not torch.equal(prefixes[0], prefixes[2])
    assert set(prefixes[0].tolist()) <= set(range(1, cfg.seq_len))


def test_bits_per_dim_divides_nats_per_token_by_ln2_and_the_channels_of_a_pixel():
    assert bits_per_dim(3 * math.log(2), config("next_pixel")) == pytest.approx(1.0)  # an RGB token: 3 dims
    assert bits_per_dim(math.log(2), replace(config("masked_pixel"), channels=1)) == pytest.approx(1.0)
    assert bits_per_dim(2.0, replace(config("next_pixel"), channels=1)) == pytest.approx(2.0 / math.log(2))
    assert bits_per_dim(1.0, config("next_patch")) is None  # a regression loss is no likelihood

