"""Padding-free text encoding: the text tower's per-token layers run on the captions' real tokens only.

A batch of captions is padded to its longest (40-48 tokens at batch 512 on Flickr30k, whose captions average about
12 words; the built-in set's average 18 tokens), so a padded tower spends most of its work on padding. Here the
projections, feed-forward layers and norms run on the real tokens packed into one (T, D) sequence; only attention
sees the padded (B, L) layout, and it masks the padding as before. The outputs are the padded model's
(tests/test_packing.py), and the weights are the same modules, so checkpoints and pretrained weights are unchanged.

The host lists the real tokens (`token_index`, built with the batch in a loader worker), so the device never has to
ask how many there are: no host sync, and a shape a compiled model can be given once.
Architectures: DistilBERT and BERT (absolute positions). Others run padded (`packed_forward` returns None).
"""

import numpy as np
import torch
import torch.nn.functional as F

MULTIPLE = 8  # packed lengths are rounded up to a multiple of 8, for tensor cores


def chunk_tokens(lengths: np.ndarray, chunks: int) -> np.ndarray:
    """(chunks,) real tokens in each micro-batch, split as torch.tensor_split splits the batch's rows."""
    return np.array([part.sum() for part in np.array_split(lengths, chunks)], dtype=np.int64)


def token_index(mask: np.ndarray, chunks: int = 1, capacity: int = 0) -> np.ndarray:
    """(chunks, T) int64: for each micro-batch (rows split as torch.tensor_split does), the flat positions in its
    (rows x L) padded layout of its real tokens, in order.

    T is the most real tokens of any micro-batch, or `capacity` if larger (training fixes it, so that every batch
    has one shape), rounded up to a multiple of 8. Slots past a micro-batch's tokens repeat its first position;
    their results are never read."""
    parts = np.array_split(mask, chunks)
    flat = [np.flatnonzero(part.reshape(-1)) for part in parts]
    width = -(-max(capacity, *(len(f) for f in flat)) // MULTIPLE) * MULTIPLE
    index = np.zeros((chunks, width), dtype=np.int64)
    for row, f in zip(index, flat):
        row[:len(f)] = f
        row[len(f):] = f[0] if len(f) else 0
    return index


def packed_forward(model):
    """The padding-free forward of a transformers encoder, or None where its architecture has none here."""
    config = model.config
    if config._attn_implementation != "sdpa" or getattr(config, "is_decoder", False):
        return None
    if config.model_type == "distilbert":
        return _distilbert
    if config.model_type == "bert" and getattr(config, "position_embedding_type", "absolute") == "absolute":
        return _bert
    return None


class _Gather(torch.autograd.Function):
    """x.index_select(0, index), whose backward is a gather too: grad.index_select(0, back) * keep.

    index_select's own backward adds the gradient of every row read back into place with atomic adds, slow in bf16
    (on an H100 it took longer than the text tower's attention). Between the packed and padded layouts, of all the
    reads of one row at most one can carry a non-zero gradient, so reading that one back is exact: `back` names it,
    and `keep` zeroes the rows whose reads all carry zeros. Those are padding that attention masks, queries whose
    output is never read, and spare packed slots."""

    @staticmethod
    def forward(ctx, x, index, back, keep):
        ctx.save_for_backward(back, keep)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        back, keep = ctx.saved_tensors
        return grad.index_select(0, back) * keep[:, None].to(grad.dtype), None, None, None


def _attend(q_lin, k_lin, v_lin, x, layout, shape, mask, heads: int, dropout: float, scale: float):
    """Self-attention of packed tokens x (T, D) in the padded layout: (B * L, D), padding rows unused."""
    batch, length = shape
    index, slots, real, filled = layout

    def padded_heads(t):  # (T, D) packed -> (B, heads, L, D / heads); padding rows hold a neighbour's values
        return _Gather.apply(t, slots, index, filled).view(batch, length, heads, -1).transpose(1, 2)

    out = F.scaled_dot_product_attention(padded_heads(q_lin(x)), padded_heads(k_lin(x)), padded_heads(v_lin(x)),
                                         attn_mask=mask, dropout_p=dropout, scale=scale)  # (B, heads, L, D / heads)
    return _Gather.apply(out.transpose(1, 2).reshape(batch * length, -1), index, slots, real)  # (T, D)


def _layout(input_ids, attention_mask, index):
    """Packed ids (T,), their positions (T,), the gather layout and the attention mask (B, 1, 1, L) that SDPA takes.

    The layout: `index` (T,) the padded position of each packed token; `slots` (B * L,) for every padded position
    the packed slot it reads: its own token's, or for padding the slot of the token before it (padding's results
    are masked or never read); `real` (B * L,) which positions are tokens; `filled` (T,) which slots hold one."""
    ids = input_ids.flatten().index_select(0, index)
    positions = index % input_ids.shape[1]
    real = attention_mask.flatten().bool()
    slots = (real.cumsum(0) - 1).clamp_(min=0)
    filled = torch.arange(len(index), device=index.device) <= slots[-1]  # the last slot read is the last token's
    return ids, positions, (index, slots, real, filled), attention_mask[:, None, None, :].bool()


def _distilbert(model, input_ids, attention_mask, index):
    """DistilBERT (transformers' DistilBertModel), packed: (B, L) ids and mask, (T,) index -> (B, L, D) hidden
    states (padding positions hold a neighbour's)."""
    ids, positions, layout, mask = _layout(input_ids, attention_mask, index)
    emb = model.embeddings
    x = emb.dropout(emb.LayerNorm(emb.word_embeddings(ids) + emb.position_embeddings(positions)))  # (T, D)
    for layer in model.transformer.layer:
        att, ffn = layer.attention, layer.ffn
        context = _attend(att.q_lin, att.k_lin, att.v_lin, x, layout, input_ids.shape, mask, att.n_heads,
                          att.dropout.p if att.training else 0.0, att.scaling)  # (T, D)
        x = layer.sa_layer_norm(att.out_lin(context) + x)
        x = layer.output_layer_norm(ffn.dropout(ffn.lin2(ffn.activation(ffn.lin1(x)))) + x)
    return x.index_select(0, layout[1]).view(*input_ids.shape, -1)


def _bert(model, input_ids, attention_mask, index):
    """BERT (transformers' BertModel, absolute positions, token type 0), packed; as _distilbert."""
    ids, positions, layout, mask = _layout(input_ids, attention_mask, index)
    emb = model.embeddings
    x = emb.word_embeddings(ids) + emb.token_type_embeddings.weight[0] + emb.position_embeddings(positions)
    x = emb.dropout(emb.LayerNorm(x))  # (T, D)
    for layer in model.encoder.layer:
        sa = layer.attention.self
        context = _attend(sa.query, sa.key, sa.value, x, layout, input_ids.shape, mask, sa.num_attention_heads,
                          sa.dropout.p if sa.training else 0.0, sa.scaling)  # (T, D)
        x = layer.attention.output(context, x)
        x = layer.output(layer.intermediate(x), x)
    return x.index_select(0, layout[1]).view(*input_ids.shape, -1)  # read as any model's output: exact backward

