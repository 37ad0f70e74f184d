"""A fused group's decoders as one batched call (SPEC §5.4, `train.batch_heads`).

At batch 4 one small decoder leaves a large GPU mostly idle; K decoders of one architecture run here as
one `vmap` over `functional_call` with their weights stacked along a leading K axis. The stack is taken
from each head's own parameters at every call, so gradients flow back into them and each head keeps its
optimiser, checkpoint and rollback. F_u's dropout mask is drawn between the two vmap-ed stages, outside
`vmap` (`randomness="error"`), from each member's own RNG stream, exactly as the member alone draws it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from affseg.decoder import SegDecoder, dropout_noise
from affseg.engine.runtime import RngStream
from affseg.method import StudentOutput
from affseg.refine.affinity import decoder_affinity


def batch_heads_enabled(setting: str, device: torch.device) -> bool:
    """`train.batch_heads`: always, never, or auto (CUDA only)."""
    return setting == "always" or (setting == "auto" and device.type == "cuda")


class _Stage(nn.Module):
    """Calls one method of a decoder, so that `functional_call` can run it with other weights."""

    def __init__(self, decoder: SegDecoder, method: str):
        super().__init__()
        self.decoder = decoder
        self.method = method

    def forward(self, *args):
        return getattr(self.decoder, self.method)(*args)


class StackedDecoders:
    """Runs K `SegDecoder`s of `template`'s architecture as one call. The template's weights are not used."""

    def __init__(self, template: SegDecoder):
        skeleton = copy.deepcopy(template).to("meta")
        self._fuse = _Stage(skeleton, "fuse_blocks")
        self._predict = _Stage(skeleton, "predict")

    def __call__(self, decoders: Sequence[SegDecoder], rngs: Sequence[RngStream], features: list[Tensor],
                 size: tuple[int, int]) -> list[StudentOutput]:
        """What each `Student(decoder)` returns on `features` ((B, C_k, h, w) each) for an image of `size`;
        rngs[k] supplies decoder k's dropout mask. Call under the runtime's autocast."""
        training = decoders[0].training
        weights = self._stacked(decoders)
        self._fuse.train(training)

        def fuse(params: dict[str, Tensor]) -> Tensor:
            return functional_call(self._fuse, params, (features,))

        def predict(params: dict[str, Tensor], fused: Tensor) -> Tensor:
            return functional_call(self._predict, params, (fused, size))

        fused = vmap(fuse, randomness="error")(weights)  # (K, B, d, h, w), before dropout
        rate = decoders[0].dropout
        if training and rate > 0:
            noise = []
            for k, rng in enumerate(rngs):
                with rng.active():
                    noise.append(dropout_noise(fused[k], rate))
            fused = fused * torch.stack(noise)
        logits = vmap(predict, randomness="error")(weights, fused)  # (K, B, classes, H, W)
        affinity = decoder_affinity(fused.flatten(0, 1)).unflatten(0, fused.shape[:2])  # (K, B, N, N)
        return [StudentOutput(logits=logits[k], aff_dec=affinity[k]) for k in range(len(decoders))]

    @staticmethod
    def _stacked(decoders: Sequence[SegDecoder]) -> dict[str, Tensor]:
        """{"decoder.<name>": (K, …)} of every parameter and buffer, differentiable back to each decoder."""
        tables = [{**dict(d.named_parameters()), **dict(d.named_buffers())} for d in decoders]
        return {f"decoder.{name}": torch.stack([table[name] for table in tables]) for name in tables[0]}
