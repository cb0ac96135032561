"""LLaMA 1, 2 and 3 in plain PyTorch: the model (with a key/value cache) and checkpoint loading.

Nothing about fine-tuning. Parameter names are Meta's state-dict keys, so a Meta checkpoint
(params.json + consolidated.*.pth) loads with a plain `load_state_dict`.

    Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models" (section 2.2:
        pre-normalisation with RMSNorm, SwiGLU, rotary embeddings).
    Touvron et al. 2023, "Llama 2" (grouped-query attention for the 34B/70B models).
    Llama Team 2024, "The Llama 3 Herd of Models" (tiktoken BPE vocabulary, rope theta 500000,
        the 3.1 long-context rope scaling).

The forward pass takes explicit positions, an attention mask and per-layer key/value caches:
one code path for training, eval.py's left-padded decoding, and the Echo suffix pass, which
continues another pass's keys and values. Loading's checks: data/checkpoints.py. Shapes in
comments: LLaMA-7B (dim 4096, 32 heads of 128, FFN 11008, vocabulary 32000), 16 samples of 256 tokens.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import checkpoints
from data.tokenizer import Tokenizer

# --------------------------------------------------------------------------------------------
# The model


@dataclass
class ModelArgs:
    """The fields of Meta's params.json (plus `ffn_hidden_dim`: HF configs state the FFN width)."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: plain multi-head attention (LLaMA 1, Llama 2 7B/13B)
    vocab_size: int = -1  # -1: take it from the tokenizer (LLaMA 1's params.json says -1)
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    use_scaled_rope: bool = False  # Llama 3.1's long-context frequency scaling
    max_seq_len: int = 2048
    ffn_hidden_dim: int | None = None  # explicit FFN width; None: Meta's rule from dim

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU width by Meta's rule: 2/3 of 4*dim, scaled, rounded up (LLaMA-7B 11008, Llama-3-8B 14336)."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_params_json(cls, path: Path) -> "ModelArgs":
        return checkpoints.read_params(path, cls)


# Named shapes (random weights of them: bench.py --shape, scripts/device_check.py).
SHAPES = {
    "smollm2-135m": ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152,
                              ffn_hidden_dim=1536, rope_theta=100000.0, max_seq_len=8192),
    "llama-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000),
    "llama2-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, max_seq_len=4096),
    "llama3-8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                           multiple_of=1024, ffn_dim_multiplier=1.3, rope_theta=500000.0),
    "tiny": ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=32),
}


class RMSNorm(nn.Module):
    """x / rms(x) * weight, with the statistics in fp32 even for bf16 activations."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_frequencies(args: ModelArgs, device=None) -> torch.Tensor:
    """Complex rotations e^{i * pos * theta_k}: (2 * max_seq_len, head_dim / 2), (4096, 64) complex64."""
    half = args.head_dim // 2
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, half, device=device, dtype=torch.float64) * 2 / args.head_dim))
    if args.use_scaled_rope:
        freqs = llama31_scaled_frequencies(freqs)
    positions = torch.arange(2 * args.max_seq_len, device=device, dtype=torch.float64)
    angles = torch.outer(positions, freqs)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def llama31_scaled_frequencies(freqs: torch.Tensor, factor: float = 8.0, low_freq_factor: float = 1.0,
                               high_freq_factor: float = 4.0, old_context_len: int = 8192) -> torch.Tensor:
    """Llama 3.1's rope scaling: long wavelengths slowed by `factor`, short ones kept, a smooth
    blend between (the Llama 3 herd paper, section 3.4.2; constants from Meta's release)."""
    wavelen = 2 * math.pi / freqs
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / factor, blended)
    return torch.where(wavelen < high_freq_wavelen, freqs, scaled)


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x0, x1), (x2, x3), ... of each head (Meta's convention). x: (B, T, H, head_dim)."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (16, 256, 32, 64) complex
    rotated = pairs * rotations[:, :, None, :]
    return torch.view_as_real(rotated).flatten(3).type_as(x)


class KVCache:
    """One attention layer's keys and values so far, (B, n_kv_heads, T, head_dim). An empty cache records
    a pass's (in the autograd graph); a later pass attends to them as its prefix (Echo suffix, decoding)."""

    def __init__(self, k: torch.Tensor | None = None, v: torch.Tensor | None = None):
        self.k, self.v = k, v

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            self.k, self.v = k, v
        else:  # out of place, so a recorded training pass stays differentiable
            self.k, self.v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def select(self, rows: torch.Tensor) -> "KVCache":
        """The cache of a subset (or reordering) of the batch's samples."""
        return KVCache(self.k[rows], self.v[rows])


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, rotations, mask, cache: KVCache | None):
        B, T, _ = x.shape  # x: (16, 256, 4096)
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (16, 256, 32, 128)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (16, 256, 32, 128); Llama-3-8B: 8 heads
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, rotations), apply_rope(k, rotations)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # heads first: (16, 32, 256, 128)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, n_kv_heads, T_past + T, head_dim)
        # no mask: plain causal (right padding never reaches a real token), SDPA's fastest kernel
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))  # heads joined again: (16, 256, 4096)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)

    def forward(self, x):  # (16, 256, 4096) -> (16, 256, 11008) inside -> (16, 256, 4096)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rotations, mask, cache):
        h = x + self.attention(self.attention_norm(x), rotations, mask, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.vocab_size <= 0:
            raise ValueError("ModelArgs.vocab_size must be set (load() takes it from the tokenizer)")
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)  # never tied (LLaMA is not)
        self.gradient_checkpointing = False
        # not a buffer: `model.to(torch.bfloat16)` would drop a complex buffer's imaginary half
        self.rope = rope_frequencies(args)
        self.fingerprint = None  # set by load(): which base weights these are (weights_fingerprint)

    @property
    def max_positions(self) -> int:
        """Positions the rotary table covers: a longer sequence has no rotation to apply."""
        return self.rope.shape[0]

    def rotations(self, positions: torch.Tensor) -> torch.Tensor:
        if self.rope.device != positions.device:
            self.rope = self.rope.to(positions.device)
        return self.rope[positions]  # (B, T, head_dim / 2) complex64: (16, 256, 64)

    def hidden_states(self, tokens, positions=None, mask=None, caches=None, collect=()):
        """The model without its output layer: (the final normed states (16, 256, 4096), {l: h_l} for
        each 1-based block l in `collect`, the residual stream leaving block l). Training applies the
        output layer only where a loss is taken, and the Echo path reads h_l off the same pass.

        positions: (B, T) (default 0..T-1 after the cache's length); mask: (B, 1, T, T_past + T) bool,
        True = may attend, None = causal; caches: one KVCache per block, or None.
        """
        if positions is None:
            start = 0 if caches is None or caches[0].k is None else caches[0].k.shape[2]
            positions = torch.arange(start, start + tokens.shape[1], device=tokens.device).expand_as(tokens)
        rotations = self.rotations(positions)
        h = self.tok_embeddings(tokens)  # (B, T, dim): (16, 256) ids -> (16, 256, 4096)
        collected = {}
        for i, layer in enumerate(self.layers):
            cache = None if caches is None else caches[i]
            if self.gradient_checkpointing and self.training and (cache is None or cache.k is None):
                h = checkpointed_block(layer, h, rotations, mask, cache)
            else:
                h = layer(h, rotations, mask, cache)
            if i + 1 in collect:
                collected[i + 1] = h
        return self.norm(h), collected

    def forward(self, tokens, positions=None, mask=None, caches=None):
        """Logits (B, T, vocab_size): (16, 256, 32000) for LLaMA-7B."""
        h, _ = self.hidden_states(tokens, positions, mask, caches)
        return self.output(h)

    def new_caches(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]


def checkpointed_block(layer, h, rotations, mask, cache: KVCache | None):
    """A block whose activations are recomputed in backward; a recording cache is filled from the
    checkpointed function's outputs, so the recomputation has no side effect."""
    def run(h):
        local = KVCache()
        return layer(h, rotations, mask, local), local.k, local.v

    h, k, v = torch.utils.checkpoint.checkpoint(run, h, use_reentrant=False)
    if cache is not None:
        cache.k, cache.v = k, v
    return h


def attention_mask(key_valid: torch.Tensor, n_queries: int) -> torch.Tensor:
    """(B, 1, n_queries, T_k) bool: the last n_queries keys' queries, causal, no padded key (key_valid
    False), but each sees itself: an all-masked row would give NaN, which poisons later layers."""
    T_k = key_valid.shape[1]
    query_pos = torch.arange(T_k - n_queries, T_k, device=key_valid.device)[:, None]
    key_pos = torch.arange(T_k, device=key_valid.device)[None, :]
    causal = key_pos <= query_pos  # (n_queries, T_k)
    allowed = causal & key_valid[:, None, :]  # (B, n_queries, T_k)
    return (allowed | (key_pos == query_pos))[:, None]


# --------------------------------------------------------------------------------------------
# Loading a Meta checkpoint folder (the checks: data/checkpoints.py; an HF folder: scripts/convert_hf.py)


def load(ckpt_dir, device="cpu", dtype=torch.bfloat16) -> tuple[Transformer, Tokenizer | None]:
    """A Meta checkpoint folder as (model in eval mode, tokenizer or None), built on the meta device so
    no random or fp32 copy of the whole model is ever made."""
    ckpt_dir = checkpoints.meta_folder(ckpt_dir)
    tokenizer = checkpoints.find_tokenizer(ckpt_dir)
    args = ModelArgs.from_params_json(ckpt_dir / "params.json")
    checkpoints.match_vocabulary(args, tokenizer, ckpt_dir)
    with torch.device("meta"):
        model = Transformer(args)
    state = checkpoints.read_weights(ckpt_dir, {k: v.shape for k, v in model.state_dict().items()})
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)
    model.rope = rope_frequencies(args, device=device)  # built on the meta device above
    model.fingerprint = checkpoints.weights_fingerprint(state)  # of the file's values, before the cast to `dtype`
    return model.eval(), tokenizer
