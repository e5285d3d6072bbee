"""halo.optim.AdamW8bit: close to torch's AdamW and to bitsandbytes' AdamW8bit over a few
hundred steps, the same on every CPU backend, bitsandbytes' state layout, state dicts that
resume exactly, use from transformers' Trainer, and clear errors."""

from __future__ import annotations

import contextlib
import copy
import functools

import pytest
import torch
from halo import _core
from halo.optim import AdamW8bit, PagedAdamW8bit


@functools.cache
def regression_cached(optimizer_class, steps=300):
    return regression(optimizer_class, steps)


def regression(optimizer_class, steps=300, **kwargs):
    torch.manual_seed(0)
    x = torch.randn(256, 64)
    y = x @ torch.randn(64, 80)
    torch.manual_seed(1)
    w = torch.nn.Parameter(0.01 * torch.randn(64, 80))
    opt = optimizer_class([w], lr=1e-2, weight_decay=0.01, **kwargs)
    losses = []
    for _ in range(steps):
        loss = ((x @ w - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return w.detach(), losses, opt


def test_close_to_torch_adamw_over_300_steps():
    ours, our_losses, opt = regression_cached(AdamW8bit)
    ref, ref_losses, _ = regression_cached(torch.optim.AdamW)
    assert our_losses[-1] < 0.02 * our_losses[0]
    assert abs(our_losses[-1] - ref_losses[-1]) < 0.15 * ref_losses[-1] + 0.05
    assert (ours - ref).abs().max() < 0.2 * ref.abs().max()
    state = opt.state[next(iter(opt.state))]
    assert state["state1"].dtype == torch.uint8 and state["absmax1"].shape == (-(-64 * 80 // 256),)


def test_close_to_bitsandbytes_adamw8bit():
    bnb = pytest.importorskip("bitsandbytes")
    ours, our_losses, _ = regression_cached(AdamW8bit)
    theirs, their_losses, _ = regression_cached(bnb.optim.AdamW8bit)
    ref, _, _ = regression_cached(torch.optim.AdamW)
    # The two 8-bit optimizers agree far better than either agrees with float32 AdamW.
    assert (ours - theirs).abs().max() < 0.05 * ref.abs().max()
    assert abs(our_losses[-1] - their_losses[-1]) < 0.02 * their_losses[-1]


def test_dynamic_map_is_bitsandbytes_unsigned_map():
    functional = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(
        torch.from_numpy(_core.optim.dynamic_map_unsigned()), functional.create_dynamic_map(False)
    )


@pytest.mark.parametrize("backend", ["avx2", "avx512"])
def test_every_cpu_backend_equals_the_scalar_reference(backend):
    if backend not in __import__("halo").backends():
        pytest.skip(f"this CPU cannot run {backend}")
    ref, _, _ = regression(AdamW8bit, steps=20, backend="scalar")
    got, _, _ = regression(AdamW8bit, steps=20, backend=backend)
    assert torch.equal(ref, got)


def test_bfloat16_parameters_and_small_parameters():
    torch.manual_seed(2)
    big = torch.nn.Parameter(torch.randn(5000, dtype=torch.bfloat16))
    small = torch.nn.Parameter(torch.randn(10))
    opt = AdamW8bit([big, small], lr=1e-2)
    for _ in range(3):
        loss = (big.float() ** 2).sum() + (small**2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert big.dtype == torch.bfloat16 and torch.isfinite(big.float()).all()
    assert opt.state[small]["state1"].dtype == torch.float32  # below min_8bit_size
    assert opt.state[big]["state1"].dtype == torch.uint8


def test_small_parameters_step_as_torch_adamw_and_bitsandbytes_32bit():
    """Below min_8bit_size the moments are float32 and every step is AdamW's: decoupled
    weight decay, both bias corrections (the second under its square root), step by step
    against torch.optim.AdamW and bitsandbytes' own 32-bit path."""
    torch.manual_seed(5)
    shapes = [(10,), (7, 13), (4095,)]  # all below the default min_8bit_size of 4096
    start = [torch.randn(shape) for shape in shapes]
    grads = [[torch.randn(shape) for shape in shapes] for _ in range(6)]
    settings = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)

    def optimizer(make):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        return params, make(params)

    runs = {
        "halo": optimizer(lambda ps: AdamW8bit(ps, **settings)),
        "torch": optimizer(lambda ps: torch.optim.AdamW(ps, amsgrad=False, **settings)),
    }
    bnb = None
    with contextlib.suppress(ImportError):
        import bitsandbytes as bnb
    if bnb is not None:  # AdamW8bit keeps float32 states below its min_8bit_size too
        runs["bitsandbytes"] = optimizer(lambda ps: bnb.optim.AdamW8bit(ps, min_8bit_size=4096, **settings))
    for step, step_grads in enumerate(grads):
        for params, opt in runs.values():
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
            opt.step()
        ours = runs["halo"][0]
        for name in ("torch", "bitsandbytes"):
            for i, (got, ref) in enumerate(zip(ours, runs.get(name, (ours,))[0], strict=True)):
                torch.testing.assert_close(
                    got,
                    ref,
                    rtol=1e-5,
                    atol=1e-6,
                    msg=lambda m: f"{name}, step {step + 1}, parameter {i}: {m}",
                )
    opt = runs["halo"][1]
    assert all(opt.state[p]["state1"].dtype == torch.float32 for p in runs["halo"][0])
    if bnb is not None:
        assert all(
            runs["bitsandbytes"][1].state[p]["state1"].dtype == torch.float32 for p in runs["bitsandbytes"][0]
        )
    # The parameters moved by more than the tolerance: the comparison above is not vacuous.
    assert all((p - s).abs().max() > 0.1 for p, s in zip(ours, start, strict=True))


def test_state_dict_resumes_exactly():
    torch.manual_seed(3)
    w = torch.nn.Parameter(torch.randn(4096 + 7))
    opt = AdamW8bit([w], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        (w**2).sum().backward()
        opt.step()
    saved_w, saved = w.detach().clone(), copy.deepcopy(opt.state_dict())  # state_dict() shares tensors
    opt.zero_grad()
    (w**2).sum().backward()
    opt.step()
    expected = w.detach().clone()
    w2 = torch.nn.Parameter(saved_w.clone())
    opt2 = AdamW8bit([w2], lr=1e-2)
    opt2.load_state_dict(saved)
    opt2.zero_grad()
    (w2**2).sum().backward()
    opt2.step()
    assert torch.equal(w2.detach(), expected)


def test_paged_variant_is_the_plain_one_on_the_cpu():
    ours, _, _ = regression(PagedAdamW8bit, steps=10)
    ref, _, _ = regression(AdamW8bit, steps=10)
    assert torch.equal(ours, ref)


def test_usable_as_trainer_optimizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(4)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 64, (8, 16))
    data = [{"input_ids": row, "labels": row} for row in ids]
    opt = AdamW8bit(model.parameters(), lr=1e-2, min_8bit_size=256)
    sched = transformers.get_cosine_schedule_with_warmup(opt, 1, 6)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=4,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched))
    result = trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 6 and losses[-1] < losses[0] and result.global_step == 6
    assert any(s["state1"].dtype == torch.uint8 for s in opt.state.values())


def test_bad_settings_give_clear_errors():
    w = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"\[AdamW8bit\] lr must be"):
        AdamW8bit([w], lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        AdamW8bit([w], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="backend"):
        AdamW8bit([w], backend="tpu")
    with pytest.raises(ValueError, match="min_8bit_size"):
        AdamW8bit([w], min_8bit_size=0)
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = AdamW8bit(emb.parameters())
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    with pytest.raises(ValueError, match=r"\[adamw8bit_step\] beta1 must be in"):
        _core.optim.adamw8bit_step(
            torch.zeros(4).numpy(),
            torch.zeros(4).numpy(),
            "float32",
            torch.zeros(4, dtype=torch.uint8).numpy(),
            torch.zeros(4, dtype=torch.uint8).numpy(),
            torch.zeros(1).numpy(),
            torch.zeros(1).numpy(),
            1e-3,
            1.5,
            0.999,
            1e-8,
            0.0,
            1,
        )
