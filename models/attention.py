"""The LM's attention: causal within each sample of a packed row, never across samples.

Training packs whole samples end to end into one row of a fixed token budget (data/packing.py), so the LM meets one
shape whatever the records. `cu_seqlens` marks where each sample starts: [0, len_0, len_0 + len_1, ..., N, N, ...]
(padded with N to a fixed size; the padding after the last sample is cut into pieces of its own). A token attends
to the tokens before it in its own sample only; position ids restart at 0 per sample (the collator makes them).

    on a GPU (bf16/fp16, or fp32 under bf16 autocast: the full phase's LM): FlashAttention's variable-length
        kernel (torch.nn.attention.varlen): per sample, no mask in memory, no work across samples
    elsewhere (the CPU, fp32): causal SDPA over each sample in turn: the same numbers, slower

Without cu_seqlens (a hand-built batch of rows) it is plain causal SDPA; generation switches the LM to transformers'
own SDPA, which reads its padding mask (VLM.generate_from_ids). The
registered name also keeps transformers from building a mask of its own: for an unmasked batch it would read the GPU
to look for packed sequences, which makes the host wait every forward.
"""
import inspect

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

try:  # torch >= 2.10 (the GPU path); without it, the per-sample SDPA below serves everywhere
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None


def takes_enable_gqa(fn):
    """Newer torch (2.15) refuses fewer key/value heads than query heads unless told (enable_gqa=True); 2.11, the
    locked one, has no such parameter and takes them as they come. The call must work on both."""
    return fn is not None and "enable_gqa" in inspect.signature(fn).parameters


VARLEN_TAKES_GQA = takes_enable_gqa(varlen_attn)

PACKED_ATTENTION = "tinyvlm_packed"


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seqlens=None,
                     max_seqlen=None, sliding_window=None, **kwargs):
    """query [1, H, N, D], key/value [1, H_kv, N, D] -> ([1, N, H, D], None), as transformers' attention functions.
    sliding_window (Phi-3, Qwen2, Mistral: transformers passes the layer's): a token sees itself and the
    sliding_window - 1 tokens before it, as in the LM's own training. Dropout inside attention is not applied to
    packed rows (the supported LMs train with none)."""
    if cu_seqlens is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    # The full phase trains the LM in fp32 and its rotary step hands fp32 queries on: run them in autocast's dtype,
    # as SDPA would. (The per-sample path below reads cu_seqlens on the host: compiled, a new sample count
    # compiled again every step, 100 s each on an H200.)
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else query.dtype
    if varlen_attn is not None and query.is_cuda and dtype in (torch.bfloat16, torch.float16):
        q, k, v = (t[0].transpose(0, 1).to(dtype) for t in (query, key, value))  # [N, H, D]
        return varlen(q, k, v, cu_seqlens, max_seqlen, scaling, sliding_window).unsqueeze(0), None  # [1, N, H, D]
    bounds = cu_seqlens.tolist()  # one sample at a time: exact, and memory in the samples' lengths, not N^2
    pieces = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b],
                                     window_mask(b - a, sliding_window, query.device), dropout=0.0, scaling=scaling,
                                     **kwargs)[0] for a, b in zip(bounds, bounds[1:]) if b > a]
    return torch.cat(pieces, dim=1), None                                         # [1, N, H, D]


def varlen(q, k, v, cu_seqlens, max_seqlen, scaling, sliding_window=None):
    """FlashAttention over a packed row: q [N, H, D], k/v [N, H_kv, D] -> [N, H, D], causal inside each sample."""
    options = dict(scale=scaling, window_size=(sliding_window - 1 if sliding_window else -1, 0))  # (-1, 0): causal
    if q.shape[1] != k.shape[1] and VARLEN_TAKES_GQA:  # grouped-query LMs: SmolLM2, Llama 3, Qwen2, ...
        options["enable_gqa"] = True
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **options)


def window_mask(n, sliding_window, device):
    """None (plain causal) for a sample no longer than the window; else [n, n], True where a token may look: itself
    and the sliding_window - 1 tokens before it, as transformers' sliding-window mask."""
    if not sliding_window or n <= sliding_window:
        return None
    i = torch.arange(n, device=device)
    return (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < sliding_window)


AttentionInterface.register(PACKED_ATTENTION, packed_attention)
