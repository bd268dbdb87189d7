"""Modules that multiply a weight without calling a layer module, swapped for equivalents that do.

The trace (orchestrator.models.info) finds layers by their module calls and the surgery quantizes a layer
by replacing its module, so a weight read functionally (`F.linear(x, self.qkv.weight)`) would be neither
counted as a layer nor quantized. Two such modules exist among torchvision's classifiers:

- `nn.MultiheadAttention` (ViT) reads its packed `in_proj_weight` and its `out_proj.weight` inside
  `F.multi_head_attention_forward`; `ExplicitMultiheadAttention` holds them as `in_proj` and `out_proj`
  Linear modules and calls both (docs/method.md §6: each is a layer like any other).
- swin's `ShiftedWindowAttention(V2)` passes `self.qkv.weight` and `self.proj.weight` to a function;
  the explicit subclasses call `self.qkv` and `self.proj`.

`make_weights_explicit(model)` swaps them in place; the results compute the same values (tests compare
them with the originals). A module it cannot express this way (an nn.MultiheadAttention with separate
key/value dimensions, bias_k/bias_v or add_zero_attn) stays as it is, and the trace lists its
projections as float operations by their weight names.

Their products of two activations (q @ k^T, attn @ v) can run quantized: when the surgery has attached
an `operand_quant` (orchestrator.quant.modules.OperandQuant) to the module, q, k, the attention weights
and v pass through its quantizers, at the activation bits of the layer `attention_ties` names.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2


class ExplicitMultiheadAttention(nn.Module):
    """nn.MultiheadAttention (same arguments, results and returned weights) with its packed input
    projection as the Linear `in_proj` (3 * embed_dim outputs: q, k, v) and `out_proj`, both called
    as modules. Self-attention (query, key and value the same tensor) projects once; otherwise the
    three inputs go through `in_proj` together and each keeps its own third, so the one packed weight
    (one quantizer) serves all three, at three times the projection's MACs, which the trace counts.

    State dicts of nn.MultiheadAttention (`in_proj_weight`, `in_proj_bias`) load into it."""

    # torch's fused Transformer fast paths read `self_attn.in_proj_weight` directly and would bypass
    # the modules (and their quantizers) in eval mode; all of them check this flag first.
    _qkv_same_embed_dim = False

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        self.embed_dim = attention.embed_dim
        self.num_heads = attention.num_heads
        self.head_dim = attention.head_dim
        self.dropout = attention.dropout
        self.batch_first = attention.batch_first
        with torch.device("meta"):  # its parameters are the attention's own, assigned below
            self.in_proj = nn.Linear(self.embed_dim, 3 * self.embed_dim, bias=attention.in_proj_bias is not None)
        self.in_proj.weight = attention.in_proj_weight
        self.in_proj.bias = attention.in_proj_bias
        self.out_proj = attention.out_proj
        self._register_load_state_dict_pre_hook(_rename_packed_keys)

    # nn.TransformerEncoderLayer reads these before it checks the flag above
    @property
    def in_proj_weight(self) -> Tensor:
        return self.in_proj.weight

    @property
    def in_proj_bias(self) -> Tensor | None:
        return self.in_proj.bias

    @staticmethod
    def can_replace(attention: nn.MultiheadAttention) -> bool:
        return (attention._qkv_same_embed_dim and attention.bias_k is None and attention.bias_v is None
                and not attention.add_zero_attn)

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if query is key and key is value:
            return self.in_proj(query).chunk(3, dim=-1)
        target, source = query.shape[0], key.shape[0]
        packed = self.in_proj(torch.cat([query, key, value]))
        embed = self.embed_dim
        return (packed[:target, :, :embed], packed[target:target + source, :, embed:2 * embed],
                packed[target + source:, :, 2 * embed:])

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        batched = query.dim() == 3
        if self.batch_first and batched:
            same_key, same_value = key is query, value is key
            query = query.transpose(0, 1)
            key = query if same_key else key.transpose(0, 1)
            value = key if same_value else value.transpose(0, 1)
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        target, batch, embed = query.shape
        source = key.shape[0]
        heads, head_dim = self.num_heads, self.head_dim
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask, mask_name="key_padding_mask", other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask", target_type=query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # scaled_dot_product_attention applies the causal mask itself
        else:
            attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                          target_type=query.dtype, check_other=False)
            if key_padding_mask is not None:
                is_causal = False
        q, k, v = self._project(query, key, value)
        if attn_mask is not None and attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)
        q = q.reshape(target, batch * heads, head_dim).transpose(0, 1)
        k = k.reshape(source, batch * heads, head_dim).transpose(0, 1)
        v = v.reshape(source, batch * heads, head_dim).transpose(0, 1)
        if key_padding_mask is not None:
            padding = key_padding_mask.view(batch, 1, 1, source).expand(-1, heads, -1, -1)
            padding = padding.reshape(batch * heads, 1, source)
            attn_mask = padding if attn_mask is None else attn_mask + padding
        dropout_p = self.dropout if self.training else 0.0
        operand_quant = getattr(self, "operand_quant", None)
        weights = None
        if need_weights or operand_quant is not None:
            if is_causal and attn_mask is None:
                attn_mask = torch.full((target, source), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
            weights, out = _attention_products(q * math.sqrt(1.0 / head_dim), k, v, attn_mask, dropout_p,
                                               operand_quant)
            out = out.transpose(0, 1).reshape(target * batch, embed)
            weights = weights.view(batch, heads, target, source)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            if attn_mask is not None:
                attn_mask = (attn_mask.view(batch, heads, -1, source) if attn_mask.size(0) != 1
                             else attn_mask.unsqueeze(0))
            out = F.scaled_dot_product_attention(
                q.view(batch, heads, target, head_dim), k.view(batch, heads, source, head_dim),
                v.view(batch, heads, source, head_dim), attn_mask, dropout_p, is_causal)
            out = out.permute(2, 0, 1, 3).reshape(target * batch, embed)
        out = self.out_proj(out).view(target, batch, -1)
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def _attention_products(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout_p: float,
                        operand_quant: nn.Module | None) -> tuple[Tensor, Tensor]:
    """softmax(q @ k^T + mask) @ v written out (q already scaled): (attention weights, output). With
    `operand_quant`, both products take quantized operands."""
    if operand_quant is not None:
        q, k = operand_quant.q(q), operand_quant.k(k)
    scores = q @ k.transpose(-2, -1)
    if attn_mask is not None:
        scores = scores + attn_mask
    weights = F.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    if operand_quant is not None:
        return weights, operand_quant.probs(weights) @ operand_quant.v(v)
    return weights, weights @ v


def _rename_packed_keys(state_dict: dict, prefix: str, *args) -> None:
    """nn.MultiheadAttention's packed projection keys -> this module's `in_proj.` keys."""
    for old, new in (("in_proj_weight", "in_proj.weight"), ("in_proj_bias", "in_proj.bias")):
        if prefix + old in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


def explicit_state_dict(model: nn.Module, state_dict: dict) -> dict:
    """`state_dict` with the keys of every nn.MultiheadAttention that `model` holds in explicit form
    renamed to that form (weights saved from the original module, e.g. a user's own checkpoint)."""
    renamed = dict(state_dict)
    for name, module in model.named_modules():
        if isinstance(module, ExplicitMultiheadAttention):
            _rename_packed_keys(renamed, f"{name}." if name else "")
    return renamed


def _explicit_window_attention(module: ShiftedWindowAttention, x: Tensor, relative_position_bias: Tensor,
                               logit_scale: Tensor | None) -> Tensor:
    """torchvision's `shifted_window_attention` with `module.qkv` and `module.proj` called as modules."""
    window, heads = module.window_size, module.num_heads
    batch, height, width, channels = x.shape
    pad_r = (window[1] - width % window[1]) % window[1]
    pad_b = (window[0] - height % window[0]) % window[0]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_h, pad_w, _ = x.shape
    shift = list(module.shift_size)
    if window[0] >= pad_h:  # a window covering the whole map needs no shift
        shift[0] = 0
    if window[1] >= pad_w:
        shift[1] = 0
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    num_windows = (pad_h // window[0]) * (pad_w // window[1])
    x = x.view(batch, pad_h // window[0], window[0], pad_w // window[1], window[1], channels)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch * num_windows, window[0] * window[1], channels)
    qkv = module.qkv(x)
    if logit_scale is not None and module.qkv.bias is not None:
        # V2 has no key bias: the function zeroes that third of the bias on every call
        qkv = qkv - F.pad(module.qkv.bias[channels:2 * channels], (channels, channels))
    qkv = qkv.reshape(x.size(0), x.size(1), 3, heads, channels // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    operand_quant = getattr(module, "operand_quant", None)
    if logit_scale is not None:  # V2: cosine attention
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    else:
        q = q * (channels // heads) ** -0.5
    if operand_quant is not None:
        q, k, v = operand_quant.q(q), operand_quant.k(k), operand_quant.v(v)
    attn = q.matmul(k.transpose(-2, -1))
    if logit_scale is not None:
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    attn = attn + relative_position_bias
    if sum(shift) > 0:
        mask = x.new_zeros((pad_h, pad_w))
        h_slices = ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None))
        w_slices = ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None))
        count = 0
        for h in h_slices:
            for w in w_slices:
                mask[h[0]:h[1], w[0]:w[1]] = count
                count += 1
        mask = mask.view(pad_h // window[0], window[0], pad_w // window[1], window[1])
        mask = mask.permute(0, 2, 1, 3).reshape(num_windows, window[0] * window[1])
        mask = mask.unsqueeze(1) - mask.unsqueeze(2)
        mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
        attn = attn.view(x.size(0) // num_windows, num_windows, heads, x.size(1), x.size(1))
        attn = (attn + mask.unsqueeze(1).unsqueeze(0)).view(-1, heads, x.size(1), x.size(1))
    attn = F.dropout(F.softmax(attn, dim=-1), p=module.attention_dropout, training=module.training)
    if operand_quant is not None:
        attn = operand_quant.probs(attn)
    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), channels)
    x = F.dropout(module.proj(x), p=module.dropout, training=module.training)
    x = x.view(batch, pad_h // window[0], pad_w // window[1], window[0], window[1], channels)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, pad_h, pad_w, channels)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :height, :width, :].contiguous()


class ExplicitShiftedWindowAttention(ShiftedWindowAttention):
    """swin's window attention calling its `qkv` and `proj` Linear modules (same parameters and keys)."""

    def forward(self, x: Tensor) -> Tensor:
        return _explicit_window_attention(self, x, self.get_relative_position_bias(), None)


class ExplicitShiftedWindowAttentionV2(ShiftedWindowAttentionV2):
    """swin V2's window attention calling its `qkv` and `proj` Linear modules (same parameters and keys)."""

    def forward(self, x: Tensor) -> Tensor:
        return _explicit_window_attention(self, x, self.get_relative_position_bias(), self.logit_scale)


_WINDOW_CLASSES = {ShiftedWindowAttention: ExplicitShiftedWindowAttention,
                   ShiftedWindowAttentionV2: ExplicitShiftedWindowAttentionV2}


def attention_ties(model: nn.Module) -> dict[str, str]:
    """Explicit attention module -> the layer whose activation bits its products (q @ k^T, attn @ v)
    take when quantized: the output projection, which reads what those products compute."""
    ties = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, ExplicitMultiheadAttention):
            ties[name] = prefix + "out_proj"
        elif isinstance(module, (ExplicitShiftedWindowAttention, ExplicitShiftedWindowAttentionV2)):
            ties[name] = prefix + "proj"
    return ties


def make_weights_explicit(model: nn.Module) -> nn.Module:
    """Swap, in place, every module that multiplies a weight functionally for its explicit form (see the
    module docstring); idempotent. Returns `model`."""
    for name, module in list(model.named_modules()):
        if type(module) in _WINDOW_CLASSES:
            module.__class__ = _WINDOW_CLASSES[type(module)]  # same state, forward through the modules
        elif type(module) is nn.MultiheadAttention and ExplicitMultiheadAttention.can_replace(module):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child,
                    ExplicitMultiheadAttention(module))
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(
                isinstance(getattr(layer, "self_attn", None), ExplicitMultiheadAttention) for layer in module.layers):
            module.use_nested_tensor = False  # its nested-tensor path reads self_attn.in_proj_weight directly
    return model
