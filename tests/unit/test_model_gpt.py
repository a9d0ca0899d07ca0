"""The transformer itself: deterministic init, features, activation checkpointing, sampling."""

import pytest
import torch

from gpt_vision.model import ModelConfig, build_model


@pytest.fixture(autouse=True)
def one_thread():
    """Small models on a shared, loaded CPU run far faster on one thread than on contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**fields):
    return ModelConfig(preset="igpt-tiny", vocab_size=16, image_size=6, **fields)


def tokens(batch=2, seed=0):
    return torch.randint(0, 16, (batch, 36), generator=torch.Generator().manual_seed(seed))


def test_init_depends_on_seed_only():
    torch.manual_seed(7)
    a = build_model(tiny())
    torch.manual_seed(7)
    b = build_model(tiny())
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
    assert a.config.n_layer == 4 and a.config.preset == "igpt-tiny"
    assert a.blocks[0].attn.c_proj.weight.std() < a.blocks[0].attn.c_attn.weight.std()  # scaled residual init


def test_features_stop_after_the_deepest_requested_layer():
    torch.manual_seed(0)
    model = build_model(tiny()).eval()
    ran = []
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda *_, i=i: ran.append(i))
    head_ran = []
    model.ln_f.register_forward_hook(lambda *_: head_ran.append(True))
    x = tokens()
    feats = model.features(x, layers=[1, 0], pool="none")
    assert ran == [0, 1] and not head_ran
    assert [f.shape for f in feats] == [(2, 36, 128), (2, 36, 128)]

    # layer i is the output of block i before the final norm: compare with a hook on block 1
    seen = {}
    model.blocks[1].register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    model(x)
    torch.testing.assert_close(feats[0], seen["out"], rtol=0, atol=0)
    pooled = model.features(x, layers=[-1])[0]
    assert pooled.shape == (2, 128)


def test_bidirectional_features_see_later_tokens_and_causal_do_not():
    torch.manual_seed(0)
    model = build_model(tiny()).eval()
    a, b = tokens(), tokens()
    b[:, 20:] = (b[:, 20:] + 1) % 16
    causal = [model.features(t, layers=[2], pool="none")[0] for t in (a, b)]
    full = [model.features(t, layers=[2], pool="none", attention="bidirectional")[0] for t in (a, b)]
    # input position p holds token p-1, so positions <= 20 cannot see the change under causal attention
    assert torch.equal(causal[0][:, :21], causal[1][:, :21])
    assert not torch.allclose(full[0][:, :21], full[1][:, :21])


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(tiny(activation_checkpointing=checkpointing))
        x = tokens()
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("top_k", [None, 4])
def test_cached_and_uncached_sampling_give_identical_tokens(top_k):
    torch.manual_seed(0)
    model = build_model(tiny()).eval()
    runs = [
        model.generate(3, top_k=top_k, generator=torch.Generator().manual_seed(5), use_cache=use_cache)
        for use_cache in (True, False)
    ]
    assert runs[0].shape == (3, 36)
    assert torch.equal(runs[0], runs[1])
    assert runs[0].min() >= 0 and runs[0].max() < 16
    if top_k is not None:  # every sampled token is among the top_k of the uncached model's logits
        logits = model(runs[0])
        allowed = logits.topk(top_k, dim=-1).indices
        assert (allowed == runs[0].unsqueeze(-1)).any(-1).all()


def test_completion_keeps_the_prompt_and_matches_uncached():
    torch.manual_seed(0)
    model = build_model(tiny()).eval()
    prompt = tokens(batch=2)[:, :18]  # the top half of a 6x6 image
    outs = [
        model.generate(prompt, temperature=0.8, generator=torch.Generator().manual_seed(1), use_cache=c)
        for c in (True, False)
    ]
    assert torch.equal(outs[0][:, :18], prompt)
    assert torch.equal(outs[0], outs[1])
    assert model.generate(prompt, max_len=20).shape == (2, 20)


def test_greedy_sampling_follows_the_argmax():
    torch.manual_seed(0)
    model = build_model(tiny()).eval()
    out = model.generate(2, max_len=10, top_k=1)
    logits = model(torch.cat([out, torch.zeros(2, 26, dtype=torch.long)], dim=1))[:, :10]
    assert torch.equal(logits.argmax(-1), out)


def test_generate_refuses_non_autoregressive_models():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="next_pixel"):
        build_model(tiny(objective="masked_pixel")).generate(2)
