"""The DiT family: equivalence with diffusers' DiT, non-causal attention against reference computations,
adaLN-Zero start, configs, flow matching and the FD feature code."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from efficientllm_utils.arch.attention import AttentionContext, GroupedQueryAttention
from efficientllm_utils.arch.config import DecoderConfig
from efficientllm_utils.arch.mla import MultiHeadLatentAttention
from efficientllm_utils.arch.nsa import NativeSparseAttention
from efficientllm_utils.dit import DiT, DiTConfig, paper_dit_config
from efficientllm_utils.dit.analysis import dit_costs
from efficientllm_utils.dit.flow import flow_matching_loss, sample
from efficientllm_utils.vision.fd import frechet_distance

from .nsa_reference import attend, nsa_projections

TINY = dict(image_size=16, patch_size=4, hidden_size=32, n_layers=2, n_heads=4, n_classes=5)


def _randomise(model: torch.nn.Module, std: float = 0.2) -> None:
    """Non-zero everywhere, so the adaLN-Zero modulations and the output layer take part in the comparison."""
    torch.manual_seed(1)
    for param in model.parameters():
        torch.nn.init.normal_(param, std=std)


# --- the mha DiT against diffusers' DiTTransformer2DModel on the same weights ---------------------------

def _to_diffusers(ours: DiT):
    """diffusers' DiT with ``ours``'s weights. Our FFN is arch's SwiGLU, so diffusers' "swiglu" FFN is used;
    its biases (and the attention output bias), which our modules do not have, are zero. diffusers gives every
    block its own timestep/label embedder (converted checkpoints repeat the shared one): each gets ours."""
    import diffusers  # a hard dependency: the comparison must run, never skip
    c = ours.config
    theirs = diffusers.DiTTransformer2DModel(
        num_attention_heads=c.n_heads, attention_head_dim=c.hidden_size // c.n_heads, in_channels=c.in_channels,
        out_channels=c.in_channels, num_layers=c.n_layers, sample_size=c.image_size, patch_size=c.patch_size,
        activation_fn="swiglu", num_embeds_ada_norm=c.n_classes, norm_eps=1e-6).eval()
    with torch.no_grad():
        theirs.pos_embed.proj.load_state_dict(ours.patch_embed.proj.state_dict())
        for block, mine in zip(theirs.transformer_blocks, ours.blocks, strict=True):
            emb = block.norm1.emb
            emb.timestep_embedder.linear_1.load_state_dict(ours.t_embedder.linear_1.state_dict())
            emb.timestep_embedder.linear_2.load_state_dict(ours.t_embedder.linear_2.state_dict())
            emb.class_embedder.embedding_table.load_state_dict(ours.y_embedder.embedding_table.state_dict())
            block.norm1.linear.load_state_dict(mine.modulation.state_dict())
            attn = block.attn1
            for theirs_proj, my_proj in ((attn.to_q, mine.attn.q_proj), (attn.to_k, mine.attn.k_proj),
                                         (attn.to_v, mine.attn.v_proj)):
                theirs_proj.load_state_dict(my_proj.state_dict())
            attn.to_out[0].weight.copy_(mine.attn.o_proj.weight)
            attn.to_out[0].bias.zero_()
            swiglu, down = block.ff.net[0].proj, block.ff.net[2]
            swiglu.weight.copy_(torch.cat((mine.mlp.up_proj.weight, mine.mlp.gate_proj.weight)))  # value, gate
            swiglu.bias.zero_()
            down.weight.copy_(mine.mlp.down_proj.weight)
            down.bias.zero_()
        theirs.proj_out_1.load_state_dict(ours.final.modulation.state_dict())
        theirs.proj_out_2.load_state_dict(ours.final.proj.state_dict())
    return theirs


def test_mha_dit_matches_diffusers_dit():
    config = DiTConfig(**TINY, attention="mha", intermediate_size=4 * 32)  # diffusers' FFN is 4x wide
    ours = DiT(config).eval()
    _randomise(ours)
    theirs = _to_diffusers(ours)
    torch.manual_seed(2)
    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([0.0, 250.5, 999.0])
    labels = torch.tensor([0, 4, 5])  # 5 = the null class
    with torch.no_grad():
        expected = theirs(x, timestep=t, class_labels=labels).sample
        got = ours(x, t, labels).sample
    assert got.shape == (3, 3, 16, 16)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_positions_match_diffusers_table():
    from diffusers.models import embeddings
    from efficientllm_utils.dit.embed import sincos_2d

    theirs = embeddings.get_2d_sincos_pos_embed(32, 4, base_size=4, output_type="pt")
    torch.testing.assert_close(sincos_2d(32, 4), theirs.float())


# --- each attention variant, non-causal, against a reference computation -----------------------------

def naive_attention(q, k, v, scale):
    """(heads, t, d) queries, (heads, T, d) keys/values -> (heads, t, d_v), softmax over every key."""
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


@pytest.mark.parametrize("attention,kv_heads", [("mha", 4), ("gqa", 2), ("mqa", 1)])
def test_grouped_attention_is_full_bidirectional_attention(attention, kv_heads):
    torch.manual_seed(0)
    config = DecoderConfig(hidden_size=32, n_heads=4, n_kv_heads=kv_heads, attention=attention, position="none")
    module = GroupedQueryAttention(config, 0).eval()
    x = torch.randn(2, 10, 32)
    q = module.q_proj(x).view(2, 10, 4, 8).transpose(1, 2)
    k = module.k_proj(x).view(2, 10, kv_heads, 8).transpose(1, 2).repeat_interleave(4 // kv_heads, 1)
    v = module.v_proj(x).view(2, 10, kv_heads, 8).transpose(1, 2).repeat_interleave(4 // kv_heads, 1)
    expected = module.o_proj(naive_attention(q, k, v, 8 ** -0.5).transpose(1, 2).reshape(2, 10, 32))
    with torch.no_grad():
        torch.testing.assert_close(module(x, AttentionContext.bidirectional()), expected.detach(), atol=1e-5, rtol=0)


def test_mla_is_full_bidirectional_attention_over_its_latent():
    torch.manual_seed(0)
    config = DecoderConfig(hidden_size=32, n_heads=4, n_kv_heads=4, attention="mla", position="none",
                           kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
    module = MultiHeadLatentAttention(config, 0).eval()
    x = torch.randn(2, 10, 32)
    q = module.q_proj(x).view(2, 10, 4, 12).transpose(1, 2)  # (b, heads, t, nope + rope)
    latent, k_shared = module.kv_a_proj(x).split([8, 4], dim=-1)
    kv = module.kv_b_proj(module.kv_a_norm(latent)).view(2, 10, 4, 14).transpose(1, 2)
    k_nope, v = kv.split([8, 6], dim=-1)
    k = torch.cat((k_nope, k_shared[:, None].expand(-1, 4, -1, -1)), dim=-1)  # the shared key part, every head
    expected = module.o_proj(naive_attention(q, k, v, 12 ** -0.5).transpose(1, 2).reshape(2, 10, 24))
    with torch.no_grad():
        torch.testing.assert_close(module(x, AttentionContext.bidirectional()), expected.detach(), atol=1e-5, rtol=0)


def naive_bidirectional_nsa(module: NativeSparseAttention, x: torch.Tensor) -> torch.Tensor:
    """Non-causal NSA from its definition, one batch row, head and query at a time: every compressed block,
    the query's own selection block plus the best-scored others, a window centred on the query."""
    b, total, _ = x.shape
    heads, kv_heads, hd = module.n_heads, module.n_kv_heads, module.head_dim
    group = heads // kv_heads
    size, l_sel, n, w = module.block, module.select_block, module.n_selected, module.window
    q, k, v, gates, starts, n_blocks = nsa_projections(module, x)

    out = torch.zeros(b, total, heads, hd)
    for bi in range(b):
        ck = [[module.compress_key((k[bi, s:s + size, g] + module.block_position).flatten()) for s in starts]
              for g in range(kv_heads)]
        cv = [[module.compress_value(v[bi, s:s + size, g].flatten()) for s in starts] for g in range(kv_heads)]
        for p in range(total):
            block_scores = [[0.0] * n_blocks for _ in range(kv_heads)]
            compressed = []
            for h in range(heads):
                g = h // group
                probs = torch.softmax(torch.stack([q[bi, p, h] @ key for key in ck[g]]) / math.sqrt(hd), dim=0)
                compressed.append(sum(prob * value for prob, value in zip(probs, cv[g], strict=True)))
                for prob, s in zip(probs, starts, strict=True):
                    for j in range(n_blocks):
                        shared = len(set(range(s, s + size)) & set(range(j * l_sel, (j + 1) * l_sel)))
                        block_scores[g][j] += prob.item() * shared
            own = p // l_sel
            for h in range(heads):
                g = h // group
                ranked = sorted(range(n_blocks), key=lambda j: (j != own, -block_scores[g][j]))[:n]
                chosen = [s for s in range(total) if s // l_sel in ranked]
                window = [s for s in range(total) if abs(s - p) <= w // 2]
                selected = attend(q[bi, p, h], [k[bi, s, g] for s in chosen], [v[bi, s, g] for s in chosen])
                windowed = attend(q[bi, p, h], [k[bi, s, g] for s in window], [v[bi, s, g] for s in window])
                out[bi, p, h] = gates[bi, p, h] @ torch.stack([compressed[h], selected, windowed])
    return module.o_proj(out.view(b, total, heads * hd))


def test_nsa_bidirectional_matches_naive_loops():
    torch.manual_seed(0)
    config = DecoderConfig(hidden_size=32, n_heads=4, n_kv_heads=2, head_dim=8, attention="nsa", position="none",
                           compress_block=4, compress_stride=2, select_block=4, n_selected=2, window=5)
    module = NativeSparseAttention(config, 0).eval()
    for param in module.parameters():
        torch.nn.init.normal_(param, std=0.3)
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(module(x, AttentionContext.bidirectional()), naive_bidirectional_nsa(module, x),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("attention", ["mha", "gqa", "mqa", "mla", "nsa"])
def test_every_patch_sees_every_other(attention):
    """Non-causal: changing the last patch changes the output at the first one (a causal model could not)."""
    model = DiT(DiTConfig(**TINY, attention=attention)).eval()
    _randomise(model, 0.1)
    x = torch.randn(1, 3, 16, 16)
    changed = x.clone()
    changed[..., -4:, -4:] += 1.0  # the last patch in raster order
    t, y = torch.tensor([500.0]), torch.tensor([1])
    with torch.no_grad():
        before, after = model(x, t, y).sample, model(changed, t, y).sample
    assert not torch.allclose(before[..., :4, :4], after[..., :4, :4])


# --- the model family -----------------------------------------------------------------------------------

@pytest.mark.parametrize("attention", ["mha", "gqa", "mqa", "mla", "nsa"])
@pytest.mark.parametrize("ffn", ["dense", "moe"])
def test_adaln_zero_starts_at_zero_and_trains(attention, ffn):
    model = DiT(DiTConfig(**TINY, attention=attention, ffn=ffn))
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    out = model(x, torch.full((4,), 300.0), y)
    assert torch.equal(out.sample, torch.zeros_like(x))  # zero-initialised output layer and modulations
    assert (out.aux_loss is not None) == (ffn == "moe")
    loss, aux = flow_matching_loss(model, x, y, torch.Generator().manual_seed(0))
    (loss + (aux if aux is not None else 0)).backward()
    assert model.final.proj.weight.grad.abs().sum() > 0


def test_sampler_is_seeded_and_in_range():
    model = DiT(DiTConfig(**TINY))
    _randomise(model, 0.05)
    labels = torch.tensor([0, 1, 2])
    a, b = sample(model, labels, steps=3, seed=5), sample(model, labels, steps=3, seed=5)
    assert torch.equal(a, b) and a.shape == (3, 3, 16, 16) and a.abs().max() <= 1
    assert not torch.equal(a, sample(model, labels, steps=3, seed=6))


def test_untrained_samples_are_the_starting_noise():
    """adaLN-Zero: the untrained velocity is exactly zero, so Euler steps add nothing (the study samples an
    untrained DiT with 0 steps and caches its FD)."""
    model = DiT(DiTConfig(**TINY, attention="nsa"))
    labels = torch.tensor([0, 1, 2, 3])
    assert torch.equal(sample(model, labels, steps=4, seed=2), sample(model, labels, steps=0, seed=2))


def test_weight_average_follows_the_trained_weights():
    from efficientllm_utils.dit.train import train, weight_average

    model = DiT(DiTConfig(**TINY))
    batches = iter([(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]))] * 3)
    copy, smooth = weight_average(model, 0.0), weight_average(model, 0.9)
    trained_after = []  # the weights w1, w2 that each update of the average saw
    update = smooth.update_parameters

    def recording_update(m):
        trained_after.append({n: p.detach().clone() for n, p in m.named_parameters()})
        update(m)

    smooth.update_parameters = recording_update
    steps = train(model, batches, 2, lr=1e-2, warmup=0, min_lr=1e-3, ema=smooth)
    copy.update_parameters(model)  # decay 0: exactly the current weights
    assert len(steps) == 2 and torch.equal(copy.module.final.proj.weight, model.final.proj.weight)
    # the first update copies w1, the second gives 0.9 w1 + 0.1 w2, every parameter
    w1, w2 = trained_after
    assert all(torch.equal(w2[n], p) for n, p in model.named_parameters())
    averaged = dict(smooth.module.named_parameters())
    for name in w1:
        torch.testing.assert_close(averaged[name], 0.9 * w1[name] + 0.1 * w2[name], rtol=1e-6, atol=1e-7)
    assert not torch.equal(w1["final.proj.weight"], w2["final.proj.weight"])  # the two steps moved it
    assert isinstance(smooth.module, DiT)


def test_paper_shapes_and_bad_configs():
    xl = paper_dit_config("DiT-XL/2", attention="gqa")
    assert (xl.n_layers, xl.hidden_size, xl.n_heads, xl.patch_size, xl.n_tokens) == (28, 1152, 16, 2, 256)
    costs = dit_costs(paper_dit_config("DiT-B/4"), batch_size=1)
    assert 125e6 < costs["params_total"] < 140e6  # DiT-B/4 has 130M parameters (ours: SwiGLU, 8/3 wide)
    assert costs["params_active"] == costs["params_total"] and costs["flops_per_step"] == 3 * costs["flops_per_image"]
    moe = dit_costs(paper_dit_config("DiT-B/4", ffn="moe", n_experts=8, moe_top_k=2), batch_size=1)
    assert moe["params_total"] > 2 * costs["params_total"]  # 8 experts of half the width: 4x the FFN
    assert abs(moe["params_active"] - costs["params_total"]) < 0.01 * costs["params_total"]  # top-2: dense width
    assert abs(moe["flops_per_image"] - costs["flops_per_image"]) < 0.01 * costs["flops_per_image"]
    with pytest.raises(ValueError, match="patch_size=5 must divide image_size=32"):
        DiTConfig(patch_size=5)
    with pytest.raises(ValueError, match="allowed values"):
        DiTConfig(attention="linear")
    with pytest.raises(ValueError, match="allowed values: DiT-"):
        paper_dit_config("DiT-S/3x")


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 8))
    assert abs(frechet_distance(a, a)) < 1e-6
    shifted = frechet_distance(a, a + 2.0)
    assert abs(shifted - 4 * 8) < 1e-3  # a mean shift of 2 in each of 8 dims, same covariance
    assert frechet_distance(a, rng.normal(size=(400, 8))) < frechet_distance(a, 3 * rng.normal(size=(400, 8)))
