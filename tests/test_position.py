"""Position schemes checked against their definitions, computed independently here.

Covers the sinusoidal table, RoPE, ALiBi and Shaw-style relative scores, both as standalone
functions/modules and inside one attention layer (a hand-written reference attention).
"""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.model.attention import Attention, AttentionContext, build_mask
from lmforge.model.position import (
    RelativePositionScores,
    Rotary,
    SinusoidalPositions,
    alibi_bias,
    alibi_slopes,
    sinusoidal_table,
)

# --------------------------------------------------------------------------- sinusoidal


@pytest.mark.parametrize("n_positions,dim", [(50, 16), (7, 2), (33, 64)])
def test_sinusoidal_table_matches_formula(n_positions, dim):
    table = sinusoidal_table(n_positions, dim)
    assert table.shape == (n_positions, dim)
    assert table.dtype == torch.float32
    expected = torch.empty(n_positions, dim, dtype=torch.float64)
    for pos in range(n_positions):
        for i in range(dim // 2):
            angle = pos / 10000 ** (2 * i / dim)
            expected[pos, 2 * i] = math.sin(angle)
            expected[pos, 2 * i + 1] = math.cos(angle)
    torch.testing.assert_close(table.double(), expected, atol=1e-6, rtol=0)


def test_sinusoidal_known_values():
    table = sinusoidal_table(4, 4)
    # position 0: sin(0)=0, cos(0)=1 in every pair
    assert table[0].tolist() == [0.0, 1.0, 0.0, 1.0]
    # position 1, pair 0 has frequency 1; pair 1 has frequency 1/100 (10000^(2/4))
    torch.testing.assert_close(
        table[1], torch.tensor([math.sin(1), math.cos(1), math.sin(0.01), math.cos(0.01)]), atol=1e-7, rtol=0
    )


def test_sinusoidal_module_looks_up_rows_and_is_not_a_parameter():
    module = SinusoidalPositions(20, 8)
    assert list(module.parameters()) == []
    assert "table" not in module.state_dict()  # fixed: not saved
    ids = torch.tensor([[0, 5, 19], [3, 3, 0]])
    out = module(ids)
    assert out.shape == (2, 3, 8)
    torch.testing.assert_close(out, sinusoidal_table(20, 8)[ids], atol=0, rtol=0)


# --------------------------------------------------------------------------- RoPE


def _pairs(d: int, layout: str) -> list[tuple[int, int]]:
    """Feature pairs rotated together, pair i at frequency theta^(-2i/d).

    interleaved: (2i, 2i+1), as in the RoFormer paper; half: (i, i + d/2), as in GPT-NeoX/Llama."""
    if layout == "interleaved":
        return [(2 * i, 2 * i + 1) for i in range(d // 2)]
    return [(i, i + d // 2) for i in range(d // 2)]


def _rope_reference(x: torch.Tensor, positions: list[int], theta: float = 10000.0, layout: str = "half"):
    """Rotate each pair (a, b) by angle pos * theta^(-2i/d), written out pair by pair."""
    out = torch.empty_like(x, dtype=torch.float64)
    d = x.shape[-1]
    for t, pos in enumerate(positions):
        for i, (ia, ib) in enumerate(_pairs(d, layout)):
            angle = pos * theta ** (-2 * i / d)
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[..., t, ia].double(), x[..., t, ib].double()
            out[..., t, ia] = a * c - b * s
            out[..., t, ib] = a * s + b * c
    return out


def rope_layout() -> str:
    """lmforge pairs features (i, i + d/2), the GPT-NeoX/Llama layout that Llama checkpoints use."""
    return "half"


def test_rope_matches_rotation_formula():
    layout = rope_layout()
    torch.manual_seed(0)
    rot = Rotary(head_dim=16, n_positions=40, theta=10000.0)
    x = torch.randn(2, 3, 5, 16)
    positions = [0, 1, 7, 20, 39]
    out = rot(x, torch.tensor([positions]))
    torch.testing.assert_close(out.double(), _rope_reference(x, positions, layout=layout), atol=1e-5, rtol=0)


def test_rope_uses_theta():
    layout = rope_layout()
    torch.manual_seed(0)
    x = torch.randn(1, 1, 3, 4)
    out = Rotary(4, 10, theta=500.0)(x, torch.tensor([[2, 5, 9]]))
    ref = _rope_reference(x, [2, 5, 9], theta=500.0, layout=layout)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


def test_rope_position_zero_is_identity():
    torch.manual_seed(0)
    x = torch.randn(2, 2, 4, 16)
    out = Rotary(16, 8)(x, torch.zeros(1, 4, dtype=torch.long))
    torch.testing.assert_close(out, x, atol=0, rtol=0)


def test_rope_preserves_vector_norms():
    torch.manual_seed(0)
    rot = Rotary(32, 128)
    x = torch.randn(3, 4, 10, 32)
    positions = torch.randint(0, 128, (3, 10))
    out = rot(x, positions)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    # ...and actually changes the vectors (norm preservation is not the identity)
    assert (out - x).abs().max() > 0.1


def test_rope_per_row_positions():
    """position_ids of shape (B, T) rotate each batch row by its own positions."""
    torch.manual_seed(0)
    rot = Rotary(8, 16)
    x = torch.randn(2, 1, 3, 8)
    pos = torch.tensor([[0, 1, 2], [5, 6, 7]])
    out = rot(x, pos)
    for b in range(2):
        torch.testing.assert_close(out[b : b + 1], rot(x[b : b + 1], pos[b : b + 1]), atol=0, rtol=0)
    assert not torch.allclose(out[0], rot(x[0:1], pos[1:2])[0])


def test_rope_dot_product_depends_only_on_relative_offset():
    torch.manual_seed(0)
    rot = Rotary(16, 200)
    q = torch.randn(1, 1, 1, 16)
    k = torch.randn(1, 1, 1, 16)

    def score(m: int, n: int) -> float:
        qm = rot(q, torch.tensor([[m]]))
        kn = rot(k, torch.tensor([[n]]))
        return (qm * kn).sum().item()

    for offset in (0, 1, 3, 17, -5):
        base = score(20 + offset, 20)
        for start in (25, 60, 150):
            assert score(start + offset, start) == pytest.approx(base, abs=1e-4)
    # different offsets give different scores (so the check above is not vacuous)
    assert abs(score(21, 20) - score(30, 20)) > 1e-3


# --------------------------------------------------------------------------- ALiBi


def test_alibi_slopes_eight_heads():
    expected = torch.tensor([1 / 2**i for i in range(1, 9)])
    torch.testing.assert_close(alibi_slopes(8), expected, atol=1e-9, rtol=0)


def test_alibi_slopes_powers_of_two():
    # for n heads the slopes are 2^(-8/n), 2^(-16/n), ..., 2^(-8)
    for n in (1, 2, 4, 16):
        expected = torch.tensor([2 ** (-8 * (i + 1) / n) for i in range(n)])
        torch.testing.assert_close(alibi_slopes(n), expected, atol=1e-9, rtol=1e-6)


def test_alibi_slopes_non_power_of_two():
    # The paper's reference code: slopes of the nearest lower power of two (4: 2^-2 .. 2^-8),
    # then every other slope of the next power of two (8: 2^-1, 2^-3, ...), as many as needed.
    torch.testing.assert_close(
        alibi_slopes(6), torch.tensor([2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]), atol=1e-9, rtol=0
    )
    s12 = alibi_slopes(12)
    assert s12.shape == (12,)
    assert len(set(s12.tolist())) == 12  # all distinct


def test_alibi_bias_causal_and_bidirectional():
    slopes = torch.tensor([0.5, 0.25])
    q_pos = torch.arange(3)
    causal = alibi_bias(slopes, q_pos, 3, causal=True)
    bidir = alibi_bias(slopes, q_pos, 3, causal=False)
    assert causal.shape == bidir.shape == (2, 3, 3)
    for h, m in enumerate([0.5, 0.25]):
        for i in range(3):
            for j in range(3):
                assert bidir[h, i, j].item() == pytest.approx(-m * abs(i - j))
                if j <= i:  # the only entries a causal model uses
                    assert causal[h, i, j].item() == pytest.approx(-m * (i - j))


def test_alibi_bias_with_query_offset():
    """With a cache the queries sit at the end of the key sequence."""
    slopes = torch.tensor([0.5])
    bias = alibi_bias(slopes, torch.tensor([4]), 5, causal=True)
    torch.testing.assert_close(bias[0, 0], torch.tensor([-2.0, -1.5, -1.0, -0.5, 0.0]))


# --------------------------------------------------------------------------- Shaw relative


def test_relative_scores_match_direct_definition():
    torch.manual_seed(0)
    k_clip, hd = 2, 4
    rel = RelativePositionScores(k_clip, hd)
    with torch.no_grad():
        rel.table.weight.normal_()
    B, H, T = 2, 3, 6
    q = torch.randn(B, H, T, hd)
    scores = rel(q, torch.arange(T), T)
    assert scores.shape == (B, H, T, T)
    expected = torch.empty(B, H, T, T)
    for i in range(T):
        for j in range(T):
            d = max(-k_clip, min(k_clip, j - i))
            a = rel.table.weight[d + k_clip]  # a_{-k} .. a_{k} stored at rows 0 .. 2k
            expected[:, :, i, j] = (q[:, :, i] * a).sum(-1)
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=1e-6)


def test_relative_scores_with_query_offset():
    """Queries at positions past..past+Tq against keys 0..Tk-1 (the cached case)."""
    torch.manual_seed(1)
    k_clip, hd = 3, 2
    rel = RelativePositionScores(k_clip, hd)
    q = torch.randn(1, 1, 2, hd)
    q_pos = torch.tensor([5, 6])
    scores = rel(q, q_pos, 7)
    for qi, i in enumerate(q_pos.tolist()):
        for j in range(7):
            d = max(-k_clip, min(k_clip, j - i))
            expected = (q[0, 0, qi] * rel.table.weight[d + k_clip]).sum()
            assert scores[0, 0, qi, j].item() == pytest.approx(expected.item(), abs=1e-6)


def test_relative_scores_receive_gradient():
    rel = RelativePositionScores(2, 4)
    q = torch.randn(1, 1, 5, 4, requires_grad=True)
    rel(q, torch.arange(5), 5).sum().backward()
    assert rel.table.weight.grad is not None
    assert (rel.table.weight.grad.abs().sum(-1) > 0).all()  # every distance row is used in a 5x5 grid
    assert q.grad is not None


# --------------------------------------------------------------------------- inside attention


def _reference_attention(attn: Attention, x: torch.Tensor, causal: bool, position: str) -> torch.Tensor:
    """Plain-loop-free but independent attention: softmax((q k^T + q a^T) / sqrt(d) + alibi) v."""
    B, T, _ = x.shape
    H, Hk, hd = attn.n_head, attn.n_kv_head, attn.head_dim
    w, b = attn.qkv.weight, attn.qkv.bias
    qkv = x @ w.t() + b
    q, k, v = qkv.split([H * hd, Hk * hd, Hk * hd], dim=-1)
    q = q.view(B, T, H, hd).transpose(1, 2)
    k = k.view(B, T, Hk, hd).transpose(1, 2).repeat_interleave(H // Hk, dim=1)
    v = v.view(B, T, Hk, hd).transpose(1, 2).repeat_interleave(H // Hk, dim=1)
    if position == "rope":
        pos, layout = list(range(T)), rope_layout()
        q = _rope_reference(q, pos, layout=layout).float()
        k = _rope_reference(k, pos, layout=layout).float()
    scores = q @ k.transpose(-1, -2)
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    if position == "relative":
        kc = attn.relative.max_distance
        a = attn.relative.table.weight[((j - i).clamp(-kc, kc) + kc)]  # (T, T, hd)
        scores = scores + torch.einsum("bhid,ijd->bhij", q, a)
    scores = scores / math.sqrt(hd)
    if position == "alibi":
        slopes = torch.tensor([2 ** (-8 * (h + 1) / H) for h in range(H)])
        dist = (i - j).abs() if not causal else (i - j)
        scores = scores - slopes[:, None, None] * dist
    if causal:
        scores = scores.masked_fill(j > i, float("-inf"))
    y = scores.softmax(-1) @ v
    y = y.transpose(1, 2).reshape(B, T, H * hd)
    return attn.proj(y)


@pytest.mark.parametrize("position", ["relative", "alibi", "rope", "none"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_attention_layer_matches_reference(position, causal, n_kv_head):
    torch.manual_seed(0)
    cfg = ModelConfig(n_embd=32, n_head=4, n_kv_head=n_kv_head, position=position, relative_distance=3, block_size=16)
    rotary = Rotary(cfg.head_dim, cfg.block_size) if position == "rope" else None
    attn = Attention(cfg, 0, causal=causal, rotary=rotary).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    T = 9
    x = torch.randn(2, T, 32)
    q_index = torch.arange(T)
    mask, is_causal = build_mask(q_index, T, causal, None, explicit=position in ("relative", "alibi"))
    ctx = AttentionContext(mask, is_causal, torch.arange(T)[None], q_index)
    out = attn(x, ctx)
    ref = _reference_attention(attn, x, causal, position)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_rope_backward_is_the_exact_gradient():
    """The rotation's gradient (through roll and the sign-folded sine table) against finite
    differences, in float64, with per-row positions."""
    rot = Rotary(8, 16)
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True)
    positions = torch.tensor([[0, 3, 4, 9, 15], [1, 2, 7, 8, 11]])
    assert torch.autograd.gradcheck(lambda t: rot(t, positions), (x,))
