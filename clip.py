"""The CLIP model (two towers, two heads, a learnable temperature) and the contrastive loss as pure functions."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import Config
from modules import ImageEncoder, ProjectionHead, TextEncoder, build_text_config

MAX_LOGIT_SCALE = math.log(100)  # the logit scale is clamped at 100, as in the CLIP paper (Radford et al. 2021, 2.5)


class CLIPModel(nn.Module):
    def __init__(self, cfg: Config, vocab_size: int, text_config=None, pad_id: int | None = None):
        """text_config: the text tower's transformers config, to rebuild a saved model with no download; pad_id: the
        tokenizer's padding id, for a text tower built with random weights."""
        super().__init__()
        self.image_encoder = ImageEncoder(cfg.image_model, cfg.image_pretrained, cfg.image_size)
        if text_config is None:
            text_config = build_text_config(cfg.text_model, cfg.text_pretrained, cfg.text_layers, cfg.text_width,
                                            cfg.text_heads, vocab_size, cfg.max_length, pad_id)
        positions = getattr(text_config, "max_position_embeddings", None)  # None: relative positions (T5)
        if positions and cfg.max_length > positions:  # before a download of weights, and before any step
            raise ValueError(f"--max-length {cfg.max_length} is more tokens than --text-model {cfg.text_model} has "
                             f"positions for ({positions}); use --max-length {positions} or less")
        self.text_encoder = TextEncoder(cfg.text_model, cfg.text_pretrained, cfg.text_pooling, vocab_size,
                                        text_config)
        self.image_projection = ProjectionHead(self.image_encoder.out_dim, cfg.projection_dim, cfg.dropout)
        self.text_projection = ProjectionHead(self.text_encoder.out_dim, cfg.projection_dim, cfg.dropout)
        # stored as a log so it stays positive; starts at 1 / 0.07 as in the CLIP paper
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.init_temperature)),
                                        requires_grad=cfg.learn_temperature)
        self.frozen = [m for m, trainable in [(self.image_encoder, cfg.image_trainable),
                                              (self.text_encoder, cfg.text_trainable)] if not trainable]
        for tower in self.frozen:
            tower.requires_grad_(False)
        # batch norms that normalise with their stored statistics even in training
        self.frozen_norms = [m for m in self.image_encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                             ] if cfg.image_freeze_bn_stats else []
        if cfg.image_freeze_bn_stats and not self.frozen_norms:
            raise ValueError(f"--image-freeze-bn-stats: --image-model {cfg.image_model} has no batch norms to freeze")
        self.train()  # from the start, as train() leaves it: frozen parts in eval mode

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.frozen + self.frozen_norms:  # frozen towers keep their statistics and skip dropout
            module.eval()
        return self

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, D) unit-length embeddings."""
        return F.normalize(self.image_projection(self.image_encoder(images)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_index: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) token ids and mask -> (B, D) unit-length embeddings. token_index (T,): the flat positions of the
        real tokens (packing.token_index), so that the text tower skips the padding; the result is the same."""
        return F.normalize(self.text_projection(self.text_encoder(input_ids, attention_mask, token_index)), dim=-1)

    def scale(self) -> torch.Tensor:
        """The logit multiplier exp(logit_scale). Each training step caps the parameter at ln(100) afterwards, as
        open_clip does; capping it here instead would cut its gradient at the cap, and it could never come back."""
        return self.logit_scale.exp()

    def forward(self, images, input_ids, attention_mask, token_index=None):
        return self.encode_image(images), self.encode_text(input_ids, attention_mask, token_index), self.scale()


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy over the N x N cosine-similarity matrix of matched pairs.

    image_features, text_features: (N, D), unit length, row i of each a matched pair; logit_scale: the multiplier
    (already exponentiated). Computed in float32 whatever the features' dtype.
    """
    logits = logit_scale * image_features.float() @ text_features.float().T  # (N, N); row i = image i vs all texts
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def clip_loss_rows(image_rows: torch.Tensor, text_rows: torch.Tensor, all_images: torch.Tensor,
                   all_texts: torch.Tensor, logit_scale: torch.Tensor, offset: int) -> torch.Tensor:
    """The part of `clip_loss(all_images, all_texts)` that comes from rows offset .. offset + n of both directions,
    averaged over those n rows: what one rank computes under --local-loss (as open_clip's local_loss).

    image_rows, text_rows: (n, D) this rank's pairs; all_images, all_texts: (N, D) everyone's, this rank's included.
    Averaging this over ranks gives clip_loss(all_images, all_texts).
    """
    image_to_text = logit_scale * image_rows.float() @ all_texts.float().T  # (n, N)
    text_to_image = logit_scale * text_rows.float() @ all_images.float().T  # (n, N)
    labels = torch.arange(offset, offset + len(image_rows), device=image_rows.device)
    return (F.cross_entropy(image_to_text, labels) + F.cross_entropy(text_to_image, labels)) / 2
