"""The two kinds of bridge behind one interface.

- Prefix bridges map image features ``(N_img, N, Dv)`` to visual tokens ``(N_img, M, D_lm)``
  that take the places of the ``<image>`` placeholders in the LM's input embeddings.
- Cross-attention bridges map features to latents ``(N_img, M, Dv')`` that gated
  cross-attention blocks, inserted between LM layers, attend to.
"""

from __future__ import annotations

from torch import Tensor, nn


class Bridge(nn.Module):
    """Connects an image encoder to a language decoder."""

    #: True for bridges that attend from inside the LM instead of feeding tokens to it.
    cross_attention: bool = False

    def tokens_per_image(self, num_features: int) -> int:
        """Placeholders one image takes in ``input_ids`` given ``num_features`` encoder tokens."""
        raise NotImplementedError

    def forward(self, features: Tensor) -> Tensor:
        raise NotImplementedError
