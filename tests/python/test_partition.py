"""halo.sched.partition: groups cover each layer exactly, partial terms sum to the real FFN
output (vs the transformers module), importance and the low-rank predictor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from halo.sched import partition


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=176,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=128,
    )
    return LlamaForCausalLM(cfg).eval()


def test_groups_cover_every_neuron_and_head_once(llama):
    groups = partition.neuron_groups(llama, group_size=48)
    for layer in range(2):
        ffn = np.concatenate([g.index for g in groups if g.layer == layer and g.kind == "ffn"])
        heads = np.concatenate([g.index for g in groups if g.layer == layer and g.kind == "attn"])
        assert np.array_equal(np.sort(ffn), np.arange(176))
        assert np.array_equal(np.sort(heads), np.arange(4))
    last = [g for g in groups if g.layer == 0 and g.kind == "ffn"][-1]
    assert len(last.index) == 176 - 3 * 48
    # Cost model: gate+up+down weights of 32 neurons (fp16 bytes) and 2 FLOPs per weight.
    assert last.weight_bytes == 3 * 64 * 32 * 2 and last.flops == 2 * 3 * 64 * 32
    # One head with GQA (kv heads = half): q,o 16 columns each, k,v 8 each.
    head = next(g for g in groups if g.kind == "attn")
    assert head.weight_bytes == 64 * (2 * 16 + 2 * 8) * 2


def test_partials_sum_to_the_real_mlp(llama):
    layer = llama.model.layers[0]
    groups = [g for g in partition.neuron_groups(layer, group_size=32) if g.kind == "ffn"]
    x = torch.randn(10, 64)
    parts = partition.ffn_partials(partition.ffn_weights(layer), x.numpy(), groups)
    with torch.no_grad():
        want = layer.mlp(x).numpy()
    np.testing.assert_allclose(parts.sum(0), want, rtol=1e-4, atol=1e-5)


def test_bad_group_size_and_layer_rejected(llama):
    with pytest.raises(ValueError, match=r"\[neuron_groups\].*0"):
        partition.neuron_groups(llama, group_size=0)
    with pytest.raises(TypeError, match=r"\[neuron_groups\].*Linear"):
        partition.neuron_groups(torch.nn.Linear(3, 3))


def test_importance_from_calibration_matches_numpy(llama):
    layer = llama.model.layers[1]
    groups = partition.neuron_groups(layer, group_size=16)
    x = torch.randn(20, 64)
    scores = partition.importance(layer, groups, calibration=x.numpy())
    mlp = layer.mlp
    with torch.no_grad():
        h = torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
        for i, g in enumerate(groups):
            if g.kind != "ffn":
                continue
            idx = torch.as_tensor(g.index)
            term = h[:, idx] @ mlp.down_proj.weight[:, idx].T
            assert scores[i] == pytest.approx(term.norm(dim=1).mean().item(), rel=1e-4)
            assert g.importance == scores[i]
    static = partition.importance(layer, groups)
    assert (static > 0).all()


def test_predictor_recall_on_held_out_inputs():
    """Planted structure: group scores depend on a 4-dim projection of the input; the
    rank-8 predictor must find the true top-8 of 32 groups far better than chance (0.25)."""
    rng = np.random.default_rng(0)
    proj = rng.standard_normal((48, 4))
    mix = rng.standard_normal((4, 32))
    x = rng.standard_normal((600, 48))
    y = np.abs(x @ proj @ mix) + 0.1 * rng.standard_normal((600, 32))
    pred = partition.Predictor.fit(x[:400], y[:400], rank=8)
    assert partition.recall_at_k(pred.predict(x[400:]), y[400:], k=8) > 0.6
    with pytest.raises(ValueError, match=r"\[Predictor.fit\]"):
        partition.Predictor.fit(x[:10], y[:9])
    with pytest.raises(ValueError, match=r"\[Predictor.predict\]"):
        pred.predict(np.zeros((2, 5)))


def test_recall_at_k_independent():
    truth = np.array([[5.0, 4, 3, 2, 1]])
    assert partition.recall_at_k(np.array([[1.0, 2, 3, 4, 5]]), truth, 2) == 0.0
    assert partition.recall_at_k(np.array([[5.0, 1, 4, 0, 0]]), truth, 2) == 0.5
