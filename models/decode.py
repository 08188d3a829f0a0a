"""Decoding: the LM writes each row's reply token by token, every row as if it were alone.

A batch of 256 captions from a 135M LM does little work per token but in ~1,500 small kernels, which the host
would launch one by one, and a host that waits on the GPU (to ask whether every row has stopped) adds a round trip
per token. So:

    static KV cache   transformers' StaticCache: one tensor per layer, allocated once, written in place
    one-token step    reads and writes only fixed buffers (the token, its position, which cache slots it may see),
                      so on the GPU it is recorded once as a CUDA graph and replayed: one launch per token
    stops             each row's end is kept on the device; the host looks only every STOP_CHECK tokens

Rows are left-padded to one length: a row sees its own prompt (never the padding) and its own new tokens, and
its positions count from its first real token, so its reply is the one it would get alone. The prompt runs once
(prefill), as one batched forward.
"""
import copy

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, StaticCache

STOP_CHECK = 8  # tokens between the host's looks at whether every row has stopped (each look waits for the GPU)
SLOT_MULTIPLE = 64  # the cache length is rounded up to this: prompts of nearby lengths reuse one recorded graph


DECODE_ATTENTION = "tinyvlm_decode"


def grouped_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [B, H, T, D], key/value [B, H_kv, S, D] (the whole static cache), attention_mask [B, 1, T, S] (True:
    seen) -> ([B, T, H, D], None), as transformers' attention functions. The H / H_kv query heads that share a
    key/value head (grouped-query LMs: SmolLM2, Llama 3, Qwen2) are laid out as that head's extra query rows, so
    the cache is read as it is: repeating it per query head (transformers' SDPA path, once a mask is given) copied
    the whole cache twice per layer and token, a third of a decoded token's GPU time."""
    B, H, T, D = query.shape
    groups = H // key.shape[1]
    q = query.reshape(B, key.shape[1], groups * T, D)                            # [B, H_kv, G*T, D]
    mask = attention_mask[:, :, None].expand(-1, -1, groups, -1, -1).reshape(B, 1, groups * T, -1)
    out = F.scaled_dot_product_attention(q, key.to(q.dtype), value.to(q.dtype), attn_mask=mask, scale=scaling)
    return out.view(B, H, T, D).transpose(1, 2), None                           # [B, T, H, D]


AttentionInterface.register(DECODE_ATTENTION, grouped_attention)


def left_pad(prompts, pad_id):
    """Rows of token ids -> ids [B, T] left-padded with pad_id, and mask [B, T]: 1 on each row's own tokens.
    (Through numpy: torch.tensor reads a nested list ten times slower, 9 ms for 256 captions' prompts.)"""
    T = max(len(p) for p in prompts)
    ids, mask = np.full((len(prompts), T), pad_id, dtype=np.int64), np.zeros((len(prompts), T), dtype=np.int64)
    for row, p in enumerate(prompts):
        ids[row, T - len(p):], mask[row, T - len(p):] = p, 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def pick(logits, temperature, top_p):
    """The next token of each row [B] from logits [B, V]: greedy at temperature 0, else sampled from the softmax at
    that temperature, cut to the most likely tokens whose probability adds up to top_p (the first always stays)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        beyond = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # the mass before a token already reaches top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(beyond, 0))
    return torch.multinomial(probs, 1)[:, 0]


def full_attention(config):
    """A copy of the LM's config whose every layer caches all slots: the cache is then addressed by slot, and a
    sliding window (Phi-3, Mistral) is applied by the mask instead of by a cache that rolls (which a recorded graph
    could not follow)."""
    config = copy.copy(config)
    config.layer_types = ["full_attention"] * config.num_hidden_layers
    return config


def sliding_window(config):
    """The window every attention layer keeps (None: none keeps one). A mix of windowed and full layers would need
    a mask per layer: said at once, not decoded wrong."""
    types = set(getattr(config, "layer_types", None) or [])
    window = getattr(config, "sliding_window", None)
    if len(types) > 1:
        raise ValueError(f"decoding: layers of several attention types ({sorted(types)}) are not supported")
    return window if window and types != {"full_attention"} else None


class DecodeCache(StaticCache):
    """transformers' StaticCache, whose one dtype is that of the values. Under autocast the keys come out of the
    rotary step in the hidden states' dtype, fp32 where the LM's weights are (the full phase trains them so), the
    values in autocast's: attention casts both to autocast's dtype anyway, so the keys are stored in it too."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return super().update(key_states.to(value_states.dtype), value_states, layer_idx, *args, **kwargs)


class Decoder:
    """Decoding state for one batch shape (rows, cache slots), at fixed addresses so that a CUDA graph can replay the
    one-token step. Made once per shape (VLM.decoder) and reused batch after batch."""

    def __init__(self, lm, rows, slots, device, record_graph):
        self.lm = lm
        self.window = sliding_window(lm.config)
        self.cache = DecodeCache(config=full_attention(lm.config), max_cache_len=slots)
        self.slot = torch.arange(slots, device=device)                            # [S]
        self.token = torch.zeros(rows, 1, dtype=torch.long, device=device)        # the token the step feeds
        self.position = torch.zeros(rows, 1, dtype=torch.long, device=device)     # its position in its row
        self.filled = torch.zeros((), dtype=torch.long, device=device)            # the slot it is written to
        self.visible = torch.zeros(rows, slots, dtype=torch.bool, device=device)  # slots that are not padding
        self.graph, self.logits = None, None
        if record_graph:
            self.record()

    def seen(self, query_slot):
        """[B, Q, S]: which slots each query (at slots query_slot [Q]) attends to: itself (so a padding query has
        something to see), and the non-padding slots up to it, within the window."""
        past = self.slot <= query_slot[:, None]                                   # [Q, S]
        if self.window:
            past &= self.slot > query_slot[:, None] - self.window
        return (self.visible[:, None] & past) | (self.slot == query_slot[:, None])

    def prefill(self, embeds, mask):
        """Run the prompts (embeds [B, T, D], left-padded; mask [B, T], 1 on real tokens) into the cache; returns
        the logits of the token after each prompt [B, V]."""
        T = mask.shape[1]
        self.cache.reset()
        self.visible.fill_(True)
        self.visible[:, :T] = mask.bool()
        position = (mask.cumsum(1) - 1).clamp(min=0)                              # [B, T]: from each row's start
        logits = self.lm(inputs_embeds=embeds, position_ids=position, past_key_values=self.cache, use_cache=True,
                         attention_mask=self.seen(self.slot[:T])[:, None], logits_to_keep=1).logits[:, -1]
        self.position.copy_(position[:, -1:] + 1)
        self.filled.fill_(T)
        return logits

    def forward_token(self):
        """One token per row through the LM (self.token, at self.position, into slot self.filled) -> logits [B, V].
        Reads and writes only the fixed buffers: this is what the CUDA graph records."""
        seen = self.seen(self.filled.view(1))[:, None]                            # [B, 1, 1, S]
        logits = self.lm(input_ids=self.token, position_ids=self.position, attention_mask=seen,
                         past_key_values=self.cache, use_cache=True).logits[:, -1]
        self.position += 1
        self.filled += 1
        return logits

    def step(self, token):
        """Feed token [B] (each row's last); returns the logits of the next [B, V]."""
        self.token.copy_(token[:, None])
        if self.graph is None:
            return self.forward_token()
        self.graph.replay()
        return self.logits

    def record(self):
        """Record forward_token as a CUDA graph. Warmed up first on a side stream (as torch.cuda.graph asks); the
        warm-up's writes land in a cache that prefill resets."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.forward_token()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.forward_token()


def decode(decoder, embeds, mask, max_new_tokens, stop_ids, pad_id, temperature=0.0, top_p=1.0, streamer=None):
    """The new tokens of each row [B, n], n <= max_new_tokens: a row's stop token ends it, and pad_id follows. A
    streamer (transformers' TextStreamer protocol, one row) is handed the prompt's ids, then each token as it comes."""
    stop_ids = torch.tensor(stop_ids, device=mask.device)
    if streamer is not None:
        streamer.put(torch.zeros(1, 0, dtype=torch.long))  # the prompt: embeddings here, no ids to show
    logits = decoder.prefill(embeds, mask)
    done = torch.zeros(len(mask), dtype=torch.bool, device=mask.device)
    tokens = []
    for n in range(max_new_tokens):
        token = pick(logits, temperature, top_p).masked_fill(done, pad_id)
        tokens.append(token)
        done |= torch.isin(token, stop_ids)
        if streamer is not None:
            streamer.put(token.cpu())
        if n + 1 == max_new_tokens or ((n + 1) % STOP_CHECK == 0 and bool(done.all())):
            break
        logits = decoder.step(token)
    if streamer is not None:
        streamer.end()
    return torch.stack(tokens, dim=1)
