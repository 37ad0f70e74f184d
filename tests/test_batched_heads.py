"""A fused group's decoders as one vmap-ed call (affseg.engine.batched) against the decoders run one by one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from affseg.decoder import SegDecoder, dropout_noise
from affseg.engine.batched import StackedDecoders, batch_heads_enabled
from affseg.engine.runtime import RngStream
from affseg.method import Student

K = 3
SIZE = (64, 64)
DROPOUT = 0.3
# Stacked weights turn K matmuls into one batched matmul: float reduction order may differ (~1e-7 here).
TOLERANCE = 1e-5


def _decoders() -> list[SegDecoder]:
    torch.manual_seed(0)
    return [SegDecoder([8, 8], dim=16, mlp_dim=8, depth=2, heads=2, mlp_ratio=2.0, dropout=DROPOUT).train()
            for _ in range(K)]


def _features() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(2, 8, 4, 4, generator=generator) for _ in range(2)]


def _streams() -> list[RngStream]:
    streams = []
    for seed in range(K):
        torch.manual_seed(100 + seed)
        streams.append(RngStream.capture())
    return streams


def test_dropout_noise_is_the_mask_of_torch_dropout_on_cpu():
    """The decoder draws its F_u mask itself; on CPU that is bit for bit what nn.Dropout drew (the old code)."""
    x = torch.randn(4, 16, 7, 7)
    torch.manual_seed(5)
    reference = nn.Dropout(DROPOUT).train()(x)
    torch.manual_seed(5)
    assert torch.equal(x * dropout_noise(x, DROPOUT), reference)


def test_stacked_decoders_give_each_decoders_outputs_gradients_and_rng_draws():
    decoders, features = _decoders(), _features()
    alone_rngs, stacked_rngs = _streams(), _streams()
    expected = []
    for decoder, rng in zip(decoders, alone_rngs):
        with rng.active():
            expected.append(Student(decoder)(features, SIZE))
    sum(out.logits.square().mean() + out.aff_dec.mean() for out in expected).backward()
    expected_grads = [[p.grad.clone() for p in d.parameters()] for d in decoders]
    for decoder in decoders:
        decoder.zero_grad(set_to_none=True)

    outputs = StackedDecoders(decoders[0])(decoders, stacked_rngs, features, SIZE)
    sum(out.logits.square().mean() + out.aff_dec.mean() for out in outputs).backward()

    for got, want in zip(outputs, expected):
        torch.testing.assert_close(got.logits, want.logits, atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(got.aff_dec, want.aff_dec, atol=TOLERANCE, rtol=0)
    for decoder, grads in zip(decoders, expected_grads):
        for parameter, grad in zip(decoder.parameters(), grads):
            torch.testing.assert_close(parameter.grad, grad, atol=TOLERANCE, rtol=0)
    for got, want in zip(stacked_rngs, alone_rngs):  # each member's stream advanced by its own mask only
        assert torch.equal(got.cpu, want.cpu)


def test_in_eval_mode_no_mask_is_drawn_and_outputs_match():
    decoders, features = _decoders(), _features()
    rngs = _streams()
    before = [rng.cpu.clone() for rng in rngs]
    for decoder in decoders:
        decoder.eval()
    outputs = StackedDecoders(decoders[0])(decoders, rngs, features, SIZE)
    assert all(torch.equal(rng.cpu, old) for rng, old in zip(rngs, before))
    for decoder, out in zip(decoders, outputs):
        torch.testing.assert_close(out.logits, decoder(features, SIZE)[0], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize(("setting", "device", "enabled"), [
    ("auto", "cpu", False), ("auto", "cuda", True), ("always", "cpu", True), ("never", "cuda", False)])
def test_auto_batches_the_heads_on_cuda_only(setting, device, enabled):
    assert batch_heads_enabled(setting, torch.device(device)) is enabled


def test_memory_guard_counts_the_stacked_weights_of_batched_heads():
    from affseg.config import Config
    from affseg.engine.memory import FLOAT_BYTES, STACKED_COPIES, head_bytes

    config, parameters = Config(), 1_000
    extra = head_bytes(config, parameters, batched=True) - head_bytes(config, parameters)
    assert extra == STACKED_COPIES * parameters * FLOAT_BYTES
