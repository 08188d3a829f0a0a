"""The packed attention (models/attention.py) on what the CPU cannot run itself: FlashAttention's variable-length
call as torch 2.11 (the locked one) and torch 2.15 take it, grouped-query heads included; and the sliding window
of Phi-3 and Qwen2 kept inside packed rows, as the LM's own attention keeps it."""
import inspect
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Phi3Config, Qwen2Config

from models import attention

LENGTHS = [3, 9, 12]  # samples of one packed row; the window below cuts into the longer two


def cu_seqlens(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def flash_stand_in(signature_of):
    """A CPU stand-in for torch.nn.attention.varlen.varlen_attn with the keyword parameters of one torch version:
    'torch 2.11' takes any head counts; 'torch 2.15' raises as the real one does unless enable_gqa=True."""
    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1), enable_gqa=False):
        if signature_of == "torch 2.15" and not enable_gqa and query.size(1) != key.size(1):
            raise ValueError(f"Expect query and key/value to have the same number of heads but got Hq={query.size(1)} "
                             f"and Hkv={key.size(1)}. Try setting enable_gqa=True for GQA.")
        bounds, out = cu_seq_q.tolist(), []
        for a, b in zip(bounds, bounds[1:]):
            i = torch.arange(b - a)
            back = i[:, None] - i[None, :]  # how far back each key is
            mask = (back >= -window_size[1]) & ((back <= window_size[0]) if window_size[0] >= 0 else True)
            q, k, v = (t[a:b].transpose(0, 1) for t in (query, key, value))
            out.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
                       .transpose(0, 1))
        return torch.cat(out)
    if signature_of == "torch 2.11":  # its real signature has no enable_gqa
        params = [p for p in inspect.signature(varlen_attn).parameters.values() if p.name != "enable_gqa"]
        varlen_attn.__signature__ = inspect.Signature(params)
    return varlen_attn


@pytest.mark.parametrize("torch_version", ["torch 2.11", "torch 2.15"])
@pytest.mark.parametrize("sliding_window", [None, 5])
def test_the_flash_call_takes_grouped_query_heads_on_either_torch(monkeypatch, torch_version, sliding_window):
    """SmolLM2's 9 query and 3 key/value heads: the GPU call gives what the CPU's per-sample path gives."""
    stand_in = flash_stand_in(torch_version)
    monkeypatch.setattr(attention, "varlen_attn", stand_in)
    monkeypatch.setattr(attention, "VARLEN_TAKES_GQA", attention.takes_enable_gqa(stand_in))
    torch.manual_seed(0)
    n, cu = sum(LENGTHS), cu_seqlens(LENGTHS)
    q, k, v = torch.randn(n, 9, 8), torch.randn(n, 3, 8), torch.randn(n, 3, 8)  # [N, H, D]
    if torch_version == "torch 2.15":  # the stand-in is as strict as the real one
        with pytest.raises(ValueError, match="enable_gqa"):
            stand_in(q, k, v, cu, cu, max(LENGTHS), max(LENGTHS))
    flash = attention.varlen(q, k, v, cu, max(LENGTHS), 0.3, sliding_window)
    module = SimpleNamespace(num_key_value_groups=3, is_causal=True)
    per_sample, _ = attention.packed_attention(module, *(t.transpose(0, 1)[None] for t in (q, k, v)), None,
                                               scaling=0.3, cu_seqlens=cu, max_seqlen=max(LENGTHS),
                                               sliding_window=sliding_window)
    torch.testing.assert_close(flash, per_sample[0], rtol=1e-5, atol=1e-5)


def tiny_lm(config_class, **window):
    torch.manual_seed(0)
    config = config_class(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                          **window)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


@pytest.mark.parametrize("config_class, window", [
    (Phi3Config, dict(sliding_window=5)),
    (Qwen2Config, dict(sliding_window=5, use_sliding_window=True, max_window_layers=0)),
], ids=["phi3", "qwen2"])
def test_packed_rows_keep_the_lms_sliding_window(config_class, window):
    """Each sample of a packed row gets the logits transformers' own attention gives it alone, sliding window and
    all (a sample longer than the window would otherwise attend past it, unlike the LM's training)."""
    lm = tiny_lm(config_class, **window)
    ids = torch.randint(1, 64, (sum(LENGTHS),))
    alone = [lm(input_ids=s[None]).logits[0] for s in ids.split(LENGTHS)]
    unwindowed = tiny_lm(config_class)(input_ids=ids[-LENGTHS[-1]:][None]).logits[0]
    assert not torch.allclose(unwindowed, alone[-1], atol=1e-3)  # the window matters at these lengths
    lm.set_attn_implementation(attention.PACKED_ATTENTION)
    positions = torch.cat([torch.arange(n) for n in LENGTHS])
    with torch.no_grad():
        packed = lm(input_ids=ids[None], position_ids=positions[None], cu_seqlens=cu_seqlens(LENGTHS),
                    max_seqlen=max(LENGTHS)).logits[0]
    torch.testing.assert_close(packed, torch.cat(alone), rtol=1e-5, atol=1e-5)
