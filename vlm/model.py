"""``VisionLanguageModel``: encoder -> bridge -> decoder, with a loss on answer tokens only."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vlm.config import ModelConfig
from vlm.loss import IGNORE_INDEX, cross_entropy
from vlm.packing import packed_mask
from vlm.registry import BRIDGES, DECODERS, ENCODERS, TILINGS
from vlm.weights import save_pretrained


@dataclass
class VLMOutput:
    """``logits`` ``(B, T, vocab)`` (fewer positions with ``full_logits=False``); ``loss`` when
    labels were given."""

    logits: Tensor
    loss: Tensor | None = None


class VisionLanguageModel(nn.Module):
    """An image encoder, a bridge and a causal LM.

    Images sit in the text as ``image_token_id`` placeholders: prefix bridges need
    ``tokens_per_image`` of them per image (their places take the visual tokens);
    cross-attention bridges need one per image (the LM attends to that image from there on).

    Args:
        config: the ``ModelConfig`` the parts were built from.
        encoder, bridge, decoder: the built parts (see :func:`build_model`).
    """

    def __init__(self, config: ModelConfig, encoder: nn.Module, bridge: nn.Module, decoder: nn.Module):
        super().__init__()
        self.config = config
        self.encoder, self.bridge, self.decoder = encoder, bridge, decoder
        self.image_token_id = decoder.image_token_id
        self.tokens_per_image = bridge.tokens_per_image(encoder.num_tokens)  # per tile
        self.tiling = TILINGS.build(
            config.processor.tiling,
            tile_size=encoder.image_size,
            tokens_per_tile=self.tokens_per_image,
            grid=bridge.token_grid(encoder.num_tokens),
            text_dim=decoder.hidden_size,
            marker_only=not bridge.tokens_in_text,
        )
        # transformers 5 renamed the flag; the old name still works but warns.
        lm_type = type(decoder.lm)
        self._checkpointing_flag = (
            "is_activation_checkpointing"
            if hasattr(lm_type, "is_activation_checkpointing")
            else "is_gradient_checkpointing"
        )
        bridge.attach(decoder)
        self.train()  # puts a frozen encoder in eval mode from the start

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """``(N_img, 3, H, W)`` to the bridge's output for those images."""
        return self._bridge(self.encode_pixels(pixel_values))

    def encode_pixels(self, pixel_values: Tensor) -> Tensor:
        """The encoder's features, with the pixels in the encoder's dtype (a model loaded in
        bf16 takes float32 pixels from the transforms)."""
        return self.encoder(pixel_values.to(_dtype_of(self.encoder, pixel_values.dtype)))

    def _bridge(self, features: Tensor) -> Tensor:
        return self.bridge(features.to(_dtype_of(self.bridge, features.dtype)))

    def forward(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        image_features: Tensor | None = None,
        image_index: Tensor | None = None,
        image_attention_mask: Tensor | None = None,
        image_sizes: Tensor | None = None,
        pixel_attention_mask: Tensor | None = None,
        segment_ids: Tensor | None = None,
        sample_ids: Tensor | None = None,
        loss_reduction: str = "mean",
        full_logits: bool = True,
    ) -> VLMOutput:
        """Logits, and the loss when ``labels`` are given.

        Args:
            input_ids: ``(B, T)`` with the image placeholders in place.
            pixel_values: ``(N_img, 3, H, W)``, every image of the batch in reading order
                (row by row, left to right); ``None`` for text only.
            attention_mask: ``(B, T)``, 1 for real tokens, 0 for padding.
            labels: ``(B, T)`` targets, ``-100`` where no loss is taken (prompt, padding);
                image placeholders and padding are never counted.
            image_features: the encoder's output for the images, instead of ``pixel_values``
                (training from a frozen-feature cache).
            image_index: when examples share images, ``pixel_values`` (or ``image_features``)
                may hold each distinct image once and ``image_index`` ``(N_img,)`` pick the
                row of every image in reading order: each image is encoded once.
            image_sizes: ``(N_img, 2)`` each image's original ``(height, width)`` in reading
                order, when the tiling cuts images into tiles: ``pixel_values`` (and
                ``image_index``) then hold tiles, each image's in the order the tiling cut them.
                transformers' 5-D layouts are taken too (``Tiling.flatten_inputs``): LLaVA-NeXT's
                ``(N_img, max_tiles, 3, H, W)`` with ``image_sizes``, Idefics3's ``(B, n, 3, H, W)``
                with all-zero padding images.
            pixel_attention_mask: Idefics3's mask of each image's real pixels ``(B, n, H, W)``;
                vlm takes whole tiles (as Idefics3's processor makes them), so it must be 1 on
                every image that is not padding.
            image_attention_mask: IDEFICS-style inputs for a cross-attention bridge:
                ``pixel_values`` ``(B, n_img, 3, H, W)`` and this ``(B, T, n_img)`` mask of the image
                each token attends to, instead of placeholders locating the images.
            segment_ids: ``(B, T)`` for rows packed as a shared prefix (0) followed by turns
                (1, 2, ...; see ``Processor.encode_turns``): each turn attends to the prefix and
                to itself, at positions continuing from the prefix.
            sample_ids: ``(B, T)`` for rows packing several samples (0, 1, 2, ... in order; see
                ``Processor.pack``): a token attends within its own sample only (images
                included), at positions that restart with each sample. Combines with
                ``segment_ids`` (turns inside each sample).
            loss_reduction: ``"mean"`` over counted tokens, or ``"sum"`` (the trainer divides
                by the token count of the whole global batch).
            full_logits: with ``labels``, ``False`` runs the LM head only at the positions that
                predict a labelled token (any row's): the same loss for much less work, and
                ``logits`` ``(B, K, vocab)`` hold those ``K`` positions only. Training uses it.
        """
        if pixel_attention_mask is not None:
            _check_whole_images(pixel_values, pixel_attention_mask)
        embeds, is_image = self.prepare_inputs(
            input_ids,
            pixel_values,
            image_features,
            image_index,
            image_attention_mask,
            sample_ids,
            image_sizes,
        )
        keep = None
        if labels is not None:
            labels = labels.masked_fill(is_image, IGNORE_INDEX)
            if attention_mask is not None:
                labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
            if not full_logits and self.decoder.supports_logits_to_keep:
                # Position t predicts token t + 1: only positions before an answer token need the
                # LM head, which saves most of its FLOPs and memory behind long image prefixes.
                keep = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(1)
        extra = {} if keep is None else {"logits_to_keep": keep}
        mask = attention_mask
        if segment_ids is not None or sample_ids is not None:
            mask, extra["position_ids"] = packed_mask(
                segment_ids,
                sample_ids,
                attention_mask,
                implementation=self.decoder.lm.config._attn_implementation,
                dtype=embeds.dtype,
            )
        out = self.decoder(embeds, attention_mask=mask, use_cache=False, **extra)
        if not self._recompute_needs_images():
            self.bridge.release()
        loss = None
        if keep is not None:
            loss = cross_entropy(
                out.logits.flatten(0, 1), labels[:, 1:][:, keep].flatten(), reduction=loss_reduction
            )
        elif labels is not None:
            loss = answer_loss(out.logits, labels, reduction=loss_reduction)
        return VLMOutput(logits=out.logits, loss=loss)

    def prepare_inputs(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None = None,
        image_features: Tensor | None = None,
        image_index: Tensor | None = None,
        image_attention_mask: Tensor | None = None,
        sample_ids: Tensor | None = None,
        image_sizes: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The LM's input embeddings for ``input_ids`` with the images in place.

        The bridge conditions the LM on the images (``Bridge.condition``: prefix bridges put
        their tokens at the placeholders; cross-attention bridges keep the images for the LM
        calls until ``bridge.release()``). Returns the embeddings and the placeholder mask.
        """
        is_image = input_ids == self.image_token_id
        embeds = self.decoder.embed(input_ids)
        if image_attention_mask is not None:
            if image_index is not None:
                raise ValueError("image_index does not combine with image_attention_mask")
            visual = self._visual_per_row(pixel_values, image_features, image_attention_mask)
            return self.bridge.condition_from_mask(embeds, visual, image_attention_mask), is_image
        if pixel_values is not None and pixel_values.ndim == 5:  # transformers' tiled layouts
            pixel_values, image_sizes = self.tiling.flatten_inputs(pixel_values, image_sizes)
        if image_features is None and pixel_values is not None:
            image_features = self.encode_pixels(pixel_values)
        visual = self._bridge(image_features) if image_features is not None else None
        if visual is not None and image_index is not None:
            visual = visual[image_index]  # encoded once, placed wherever the image appears
        tiles = None
        if visual is not None and (image_sizes is not None or self.tiling.splits):
            if self.bridge.tokens_in_text:
                visual = self.tiling.arrange_all(visual, image_sizes)  # (placeholders, D)
            else:  # the bridge takes each tile's output and which image it belongs to
                tiles = torch.tensor(self.tiling.tile_counts(image_sizes), device=visual.device)
        self._check_image_count(is_image, visual, tiles)
        return self.bridge.condition(embeds, visual, is_image, sample_ids, tiles), is_image

    def _visual_per_row(
        self, pixel_values: Tensor | None, image_features: Tensor | None, image_attention_mask: Tensor
    ) -> Tensor:
        """The bridge's output ``(B, n_img, ...)`` for IDEFICS-style inputs."""
        rows, n_img = image_attention_mask.shape[0], image_attention_mask.shape[-1]
        if image_features is None:
            if pixel_values is None or pixel_values.ndim != 5 or pixel_values.shape[:2] != (rows, n_img):
                raise ValueError(
                    f"with image_attention_mask {tuple(image_attention_mask.shape)}, pass pixel_values "
                    f"as ({rows}, {n_img}, 3, H, W)"
                )
            image_features = self.encode_pixels(pixel_values.flatten(0, 1))
        elif image_features.shape[0] != rows * n_img:
            raise ValueError(f"with image_attention_mask, pass image_features for {rows} x {n_img} images")
        visual = self._bridge(image_features)
        return visual.view(rows, n_img, *visual.shape[1:])

    def _recompute_needs_images(self) -> bool:
        """Gradient checkpointing re-runs LM layers (and a bridge's hooks on them) during
        backward, so the bridge keeps the images until then; the next forward replaces them."""
        return (
            self.training
            and torch.is_grad_enabled()
            and bool(getattr(self.decoder.lm, self._checkpointing_flag, False))
        )

    def train(self, mode: bool = True) -> VisionLanguageModel:
        """A frozen encoder stays in eval mode: no dropout, no BatchNorm statistics drifting, and
        the same features as a frozen-feature cache. (A frozen LM follows ``mode``, so that its
        gradient checkpointing still works.)"""
        super().train(mode)
        if mode and self.config.encoder.freeze:
            self.encoder.eval()
        return self

    def _check_image_count(
        self, is_image: Tensor, visual: Tensor | None, tiles: Tensor | None = None
    ) -> None:
        placeholders = int(is_image.sum())
        if tiles is not None:  # one marker per image, its tiles behind it
            if placeholders != len(tiles) or int(tiles.sum()) != len(visual):
                raise ValueError(
                    f"input_ids hold {placeholders} image marker(s) (id {self.image_token_id}) for "
                    f"{len(tiles)} image(s) of {int(tiles.sum())} tile(s), but {len(visual)} tile(s) "
                    "were given"
                )
            return
        if visual is not None and visual.ndim == 2:  # tiles arranged into each image's tokens
            if placeholders != visual.shape[0]:
                raise ValueError(
                    f"input_ids hold {placeholders} image placeholder(s) (id {self.image_token_id}) "
                    f"but the images' tiles give {visual.shape[0]} token(s); build the text with "
                    "the model's processor, which expands each <image> for its image's size"
                )
            return
        images = 0 if visual is None else visual.shape[0]
        if placeholders != images * self.tokens_per_image:
            raise ValueError(
                f"input_ids hold {placeholders} image placeholder(s) (id {self.image_token_id}) but "
                f"{images} image(s) were given, which need {self.tokens_per_image} each; put "
                f"{self.tokens_per_image} placeholder(s) in the text where each image goes"
            )

    def save_pretrained(self, path: str | Path, *, bridge_only: bool = False, tokenizer: Any = None) -> None:
        """Writes ``config.json`` and the weights; see :func:`vlm.weights.save_pretrained`. (Loading
        is :func:`vlm.from_pretrained`, which also reads transformers' formats.)"""
        save_pretrained(self, path, bridge_only=bridge_only, tokenizer=tokenizer)


def _check_whole_images(pixel_values: Tensor | None, pixel_attention_mask: Tensor) -> None:
    """Every image that is not all-zero padding is unmasked (``pixel_attention_mask`` 1 throughout)."""
    if pixel_values is None:
        return
    real = pixel_values.flatten(-3).ne(0).any(-1)  # (B, n) or (N,)
    if not pixel_attention_mask.flatten(-2).bool().all(-1)[real].all():
        raise ValueError(
            "pixel_attention_mask masks part of an image: vlm's encoder takes whole tiles, as "
            "Idefics3's processor cuts them (do_resize and do_image_splitting on)"
        )


def _dtype_of(module: nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype of a module's first floating-point parameter (``default`` without one)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), default)


def answer_loss(logits: Tensor, labels: Tensor, *, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy over the positions whose label is not ``-100``."""
    return cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction=reduction)


def build_model(config: ModelConfig | dict[str, Any], *, empty: bool = False) -> VisionLanguageModel:
    """Builds the model a config describes (a ``ModelConfig`` or its dict form).

    ``empty``: parameters on the meta device (no memory, no random initialisation), for a
    checkpoint's tensors to become them (``vlm.weights.load_covering(..., assign=True)``). An encoder
    that cannot be built so (``builds_empty = False``) is built as usual.
    """
    if isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    else:  # validate names early, with the same message as for dicts
        config = dataclasses.replace(
            config,
            encoder=ENCODERS.parse(config.encoder),
            bridge=BRIDGES.parse(config.bridge),
            decoder=DECODERS.parse(config.decoder),
        )
    meta = parameters_on_meta if empty else nullcontext
    with meta() if ENCODERS.get(config.encoder).builds_empty else nullcontext():
        encoder = ENCODERS.build(config.encoder)
    if config.encoder.freeze:
        encoder.requires_grad_(False)
    with meta():
        decoder = DECODERS.build(config.decoder, image_token_id=config.image_token_id)
        bridge = BRIDGES.build(
            config.bridge,
            vision_dim=encoder.feature_dim,
            text_dim=decoder.hidden_size,
            text_layers=decoder.num_layers,
        )
    return VisionLanguageModel(config, encoder, bridge, decoder)


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Parameters created inside live on the meta device: no memory and no random
    initialisation, for weights about to be loaded with ``load_state_dict(..., assign=True)``.
    Buffers (rotary tables, masks) are created as usual, as checkpoints often do not hold them.
    (It swaps ``nn.Module.register_parameter`` while inside: build in one thread at a time.)"""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register
