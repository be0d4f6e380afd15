"""What every image encoder reports: its features and its preprocessing."""

from __future__ import annotations

from torch import Tensor, nn

from vlm.schema import ConfigError

# OpenAI CLIP normalisation, the default for towers trained like it.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageEncoder(nn.Module):
    """Pixels ``(B, 3, H, W)`` to features ``(B, num_tokens, feature_dim)``.

    Subclasses set ``feature_dim``, ``num_tokens`` (at ``image_size``), ``image_size``,
    ``mean`` and ``std`` so transforms and bridges can be built to match.
    """

    feature_dim: int
    num_tokens: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    #: Whether ``build_model(..., empty=True)`` may create the parameters on the meta device.
    builds_empty: bool = True

    def forward(self, pixels: Tensor) -> Tensor:
        raise NotImplementedError


def resolve_layer(feature_layer: int, depth: int, *, where: str) -> int:
    """How many blocks to run so the output is hidden state ``feature_layer``.

    Indexing follows transformers' ``hidden_states``: 0 is the embeddings, ``i`` the output
    of block ``i``, ``-1`` the last block and ``-2`` (LLaVA's default) the penultimate.
    """
    blocks = feature_layer if feature_layer >= 0 else depth + 1 + feature_layer
    if not 0 <= blocks <= depth:
        raise ConfigError(
            f"{where}.feature_layer={feature_layer} is outside a {depth}-block encoder; "
            f"use a value in [{-depth - 1}, {depth}] (-2 is the penultimate block)"
        )
    return blocks
