"""LLaMA 1, 2 and 3 in plain PyTorch: the model, batched decoding, checkpoint loading.

One file, nothing about fine-tuning. Parameter names are Meta's state-dict keys, so a Meta
checkpoint (params.json + consolidated.*.pth) loads with a plain `load_state_dict`.

    Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models" (section 2.2:
        pre-normalisation with RMSNorm, SwiGLU, rotary embeddings).
    Touvron et al. 2023, "Llama 2" (grouped-query attention for the 34B/70B models).
    Llama Team 2024, "The Llama 3 Herd of Models" (tiktoken BPE vocabulary, rope theta 500000,
        the 3.1 long-context rope scaling).

The forward pass takes explicit positions, an attention mask and per-layer key/value caches, so
one code path serves training (right-padded batches), left-padded batched decoding, and a
training pass that continues another pass's keys and values (the echo suffix pass).

Reading order: the model; decoding; loading a Meta checkpoint folder (scripts/convert_hf.py
converts an HF one); the device and precision flags. The tokenizers are in tokenizer.py.

The shapes, for LLaMA-7B (dim 4096, 32 blocks, 32 heads of 128, FFN 11008, vocabulary 32000) on
a training batch of 16 samples of 256 tokens (B, T = 16, 256):

    tokens                      (16, 256)            ids
    h = embedding(tokens)       (16, 256, 4096)      the residual stream, in and out of every block
    q, k, v per block           (16, 32, 256, 128)   heads first (Llama-3-8B: k, v have 8 heads)
    attention mask              (16, 1, 256, 256)    bool, True = may attend; None = causal
    SwiGLU inside               (16, 256, 11008)
    final norm (`trunk`)        (16, 256, 4096)
    logits (`forward`)          (16, 256, 32000)
"""

import hashlib
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from data.files import check_json_types, read_json, regular_file
from tokenizer import Tokenizer

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
        """SwiGLU width by Meta's rule: 2/3 of 4*dim, scaled, rounded up to `multiple_of`.

        LLaMA-7B: 11008; Llama-3-8B (multiplier 1.3, multiple_of 1024): 14336; 70B: 28672.
        """
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_params_json(cls, path: Path) -> "ModelArgs":
        params = read_json(Path(path))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"{path}: unknown params.json keys {unknown}; expected a subset of {sorted(known)}")
        check_json_types(path, params, {f.name: f.type for f in fields(cls)})
        return check_model_args(cls(**params), path)


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
    """Complex rotations e^{i * pos * theta_k}: (2 * max_seq_len, head_dim / 2), complex64
    (LLaMA-7B: (4096, 64))."""
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
    """Rotate adjacent pairs (x0, x1), (x2, x3), ... of each head: Meta's convention.

    x: (B, T, H, head_dim); rotations: (B, T, head_dim / 2) complex.
    """
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (16, 256, 32, 64) complex
    rotated = pairs * rotations[:, :, None, :]
    return torch.view_as_real(rotated).flatten(3).type_as(x)


class KVCache:
    """The keys and values one attention layer has seen so far, (B, n_kv_heads, T, head_dim).

    Decoding appends one position per step. Training uses the same object two ways: an empty
    cache handed to a pass *records* its keys and values (still in the autograd graph), and a
    cache built from such a record lets a later pass attend to them as its prefix.
    """

    def __init__(self, k: torch.Tensor | None = None, v: torch.Tensor | None = None):
        self.k, self.v = k, v
        self.buffers = None  # preallocated (k, v) with room to grow, see `reserve`

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            self.k, self.v = k, v
        elif self.buffers is not None:  # write in place: no copy of what is already cached
            start, end = self.k.shape[2], self.k.shape[2] + k.shape[2]
            self.buffers[0][:, :, start:end], self.buffers[1][:, :, start:end] = k, v
            self.view_buffers(end)
        else:  # out of place, so a recorded training pass stays differentiable
            self.k, self.v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def reserve(self, extra: int):
        """Room for `extra` more positions, filled in place (decoding only, under no_grad).
        Appending by concatenation copies the whole cache at every step: at 7B, batch 32 and 200
        positions that is gigabytes of memory traffic per new token."""
        B, H, T, D = self.k.shape
        self.buffers = tuple(t.new_empty(B, H, T + extra, D) for t in (self.k, self.v))
        self.buffers[0][:, :, :T], self.buffers[1][:, :, :T] = self.k, self.v
        self.view_buffers(T)

    def view_buffers(self, length: int):
        """k and v become the first `length` positions of the preallocated buffers."""
        self.k, self.v = self.buffers[0][:, :, :length], self.buffers[1][:, :, :length]

    def select(self, rows: torch.Tensor) -> "KVCache":
        """The cache of a subset (or reordering) of the batch's samples."""
        if self.buffers is None:
            return KVCache(self.k[rows], self.v[rows])
        chosen = KVCache()
        chosen.buffers = (self.buffers[0][rows], self.buffers[1][rows])
        chosen.view_buffers(self.k.shape[2])
        return chosen


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
        # No mask means a plain causal batch (right padding never reaches a real token), which
        # lets SDPA pick its fastest kernel.
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
        # A plain attribute, not a buffer: `model.to(torch.bfloat16)` would cast a complex buffer
        # to real and silently drop the imaginary half. `rotations` moves it to the input's device.
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

    def trunk(self, tokens, positions=None, mask=None, caches=None, collect=()):
        """The model without its output layer: returns (hidden, collected).

        hidden: the final normed hidden states (B, T, dim), (16, 256, 4096) for LLaMA-7B.
        collected: {l: h_l} for each 1-based block number l in `collect`, h_l being the residual
        stream leaving block l (the state between blocks l and l + 1), (B, T, dim) each.

        `forward` is trunk + output layer. Training calls the trunk instead for two reasons: the
        output layer is applied only at the positions a loss is taken (the logits of every
        position, (16, 256, 32000) in fp32, are 0.5 GB for LLaMA-7B and 2 GB for Llama 3's
        vocabulary of 128256), and the Echo path (echo_lora.py) reads the deep source layers'
        states h_l off the same plain pass, through `collect`, to build its echo representation
        (METHOD.md items 1 and 2), so no second pass is run for them.

        tokens: (B, T). positions: (B, T) absolute positions (default 0..T-1, or after the
        cache's length). mask: (B, 1, T, T_past + T) bool, True = may attend; None = causal.
        caches: one KVCache per block, or None.
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
        h, _ = self.trunk(tokens, positions, mask, caches)
        return self.output(h)

    def new_caches(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]


def checkpointed_block(layer, h, rotations, mask, cache: KVCache | None):
    """A block under activation checkpointing: its activations are recomputed in backward.

    An empty cache that records the block's keys and values is filled from the checkpointed
    function's outputs rather than inside it, so the recomputation has no side effect.
    """
    def run(h):
        local = KVCache()
        return layer(h, rotations, mask, local), local.k, local.v

    h, k, v = torch.utils.checkpoint.checkpoint(run, h, use_reentrant=False)
    if cache is not None:
        cache.k, cache.v = k, v
    return h


def attention_mask(key_valid: torch.Tensor, n_queries: int) -> torch.Tensor:
    """(B, 1, n_queries, T_k) bool: causal over the last `n_queries` keys, no padded keys.

    key_valid: (B, T_k) bool, False at padding. The queries are the last n_queries keys. Every
    query may see itself, so a padded query never has an empty row (an all-masked row gives NaN,
    and a NaN value vector poisons later layers even where its weight is zero).
    """
    T_k = key_valid.shape[1]
    query_pos = torch.arange(T_k - n_queries, T_k, device=key_valid.device)[:, None]
    key_pos = torch.arange(T_k, device=key_valid.device)[None, :]
    causal = key_pos <= query_pos  # (n_queries, T_k)
    allowed = causal & key_valid[:, None, :]  # (B, n_queries, T_k)
    return (allowed | (key_pos == query_pos))[:, None]


# --------------------------------------------------------------------------------------------
# Decoding


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids with each prompt flush right, and (B, T) bool, True at real tokens."""
    longest = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), longest), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros((len(prompts), longest), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p):] = torch.tensor(p, device=device)
        valid[i, longest - len(p):] = True
    return tokens, valid


def shared_prefix_length(prompts: list[list[int]]) -> int:
    """The number of leading ids every prompt shares, leaving each at least one id of its own."""
    shortest = min(len(p) for p in prompts)
    n = 0
    while n < shortest - 1 and all(p[n] == prompts[0][n] for p in prompts):
        n += 1
    return n


@torch.no_grad()
def prefill(model: Transformer, prompts: list[list[int]], max_new_tokens: int, pad_id: int = 0):
    """Run left-padded prompts through the model once, filling fresh KV caches with room for
    `max_new_tokens` more positions.

    The ids every prompt starts with (the template's first lines, a third of an evaluation prompt)
    are computed once, as a batch of one, and their keys and values shared by every row; the rest
    of each prompt follows, left-padded after that shared prefix. Positions count only real tokens
    and the mask hides the padding, so a batch decodes exactly like one prompt at a time.
    Returns the last position's logits (B, vocab) (never the (B, T, vocab) of every position),
    the caches, the key mask (B, T) and each sample's next position (B,).
    """
    device = model.output.weight.device
    n_shared = shared_prefix_length(prompts)
    caches = model.new_caches()
    if n_shared:
        model.trunk(torch.tensor([prompts[0][:n_shared]], device=device), caches=caches)
        for cache in caches:  # one row's keys and values, seen by every row (expand: no copy)
            cache.k, cache.v = (t.expand(len(prompts), -1, -1, -1) for t in (cache.k, cache.v))
    tokens, rest_valid = left_pad([p[n_shared:] for p in prompts], pad_id, device)
    positions = n_shared + (rest_valid.cumsum(1) - 1).clamp(min=0)
    valid = torch.cat([rest_valid.new_ones(len(prompts), n_shared), rest_valid], dim=1)  # every key
    hidden, _ = model.trunk(tokens, positions, attention_mask(valid, tokens.shape[1]), caches)
    for cache in caches:
        cache.reserve(max_new_tokens)
    return model.output(hidden[:, -1]), caches, valid, positions[:, -1] + 1


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, stop_ids,
             pad_id: int = 0) -> list[list[int]]:
    """Batched greedy decoding; returns each prompt's new ids, up to (not including) a stop id."""
    logits, caches, valid, next_pos = prefill(model, prompts, max_new_tokens, pad_id)
    B, device = len(prompts), valid.device
    stop = torch.tensor(sorted(stop_ids), device=device, dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    new_tokens = []
    for _ in range(max_new_tokens):
        token = logits.float().argmax(-1)
        done = done | torch.isin(token, stop)
        new_tokens.append(torch.where(done, -1, token))
        if done.all():
            break
        valid = torch.cat([valid, torch.ones((B, 1), dtype=torch.bool, device=device)], dim=1)
        logits = model(token[:, None], next_pos[:, None], valid[:, None, None, :], caches)[:, -1]
        next_pos = next_pos + 1
    out = torch.stack(new_tokens, dim=1).tolist() if new_tokens else [[] for _ in prompts]
    return [[t for t in row if t >= 0] for row in out]


# --------------------------------------------------------------------------------------------
# Loading a Meta checkpoint folder (an HF folder: scripts/convert_hf.py first)


def load(ckpt_dir, device="cpu", dtype=torch.bfloat16) -> tuple[Transformer, Tokenizer | None]:
    """A Meta checkpoint folder (params.json + consolidated.NN.pth), as (model in eval mode,
    tokenizer or None). An HF folder is converted once by scripts/convert_hf.py.

    The model is built on the meta device and takes the loaded tensors as its parameters, so no
    randomly initialised or fp32 copy of the whole model is ever made.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"{ckpt_dir}: checkpoint folder not found")
    if not (ckpt_dir / "params.json").exists():  # a FIFO or folder there is refused by read_json
        if (ckpt_dir / "config.json").exists():
            raise FileNotFoundError(f"{ckpt_dir}: an HF-layout folder (config.json, no params.json); convert it "
                                    f"once: python scripts/convert_hf.py {ckpt_dir} DEST")
        raise FileNotFoundError(f"{ckpt_dir}: no params.json (a Meta checkpoint folder)")
    tokenizer = find_tokenizer(ckpt_dir)
    args = ModelArgs.from_params_json(ckpt_dir / "params.json")
    match_vocabulary(args, tokenizer, ckpt_dir)
    with torch.device("meta"):
        model = Transformer(args)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state = read_meta_weights(ckpt_dir, expected)
    check_weights(state, expected, ckpt_dir)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)
    model.rope = rope_frequencies(args, device=device)  # built on the meta device above
    model.fingerprint = weights_fingerprint(state)  # of the file's values, before the cast to `dtype`
    return model.eval(), tokenizer


def check_model_args(args: ModelArgs, path: Path, keys: dict[str, str] | None = None) -> ModelArgs:
    """`args` as read from `path`, checked once, before any model is built from them: a value that
    builds no model or one that computes NaN (norm_eps -1, rope_theta 0) is a ValueError naming
    the file and its key (`keys`: the file's name for each field, an HF config.json's)."""
    inf = math.inf
    rules = [  # (field, test, the values it may take), in order: later tests rely on earlier ones
        ("dim", lambda a: a.dim > 0, "> 0"), ("n_layers", lambda a: a.n_layers > 0, "> 0"),
        ("n_heads", lambda a: a.n_heads > 0, "> 0"),
        ("n_kv_heads", lambda a: a.n_kv_heads is None or a.n_kv_heads > 0 and a.n_heads % a.n_kv_heads == 0,
         f"> 0 and a divisor of the {args.n_heads} query heads"),
        ("dim", lambda a: a.dim % (2 * a.n_heads) == 0, f"a multiple of 2 x {args.n_heads} heads (heads of "
         "one even size: rotary pairs)"),
        ("vocab_size", lambda a: a.vocab_size > 0 or a.vocab_size == -1, "> 0 (or -1: the tokenizer's)"),
        ("multiple_of", lambda a: a.multiple_of >= 1, ">= 1"),
        ("ffn_dim_multiplier", lambda a: a.ffn_dim_multiplier is None or 0 < a.ffn_dim_multiplier < inf,
         "> 0 and finite"),
        ("ffn_hidden_dim", lambda a: a.ffn_hidden_dim is None or a.ffn_hidden_dim > 0, "> 0"),
        ("norm_eps", lambda a: 0 < a.norm_eps < inf, "> 0 and finite"),
        ("rope_theta", lambda a: 0 < a.rope_theta < inf, "> 0 and finite"),
        ("max_seq_len", lambda a: a.max_seq_len >= 1, ">= 1"),
    ]
    for name, ok, allowed in rules:
        if not ok(args):
            key = (keys or {}).get(name, name)
            raise ValueError(f"{path}: {key!r} is {getattr(args, name)}, expected {allowed}")
    if args.hidden_dim < 1:
        raise ValueError(f"{path}: the FFN width from dim, multiple_of and ffn_dim_multiplier is {args.hidden_dim}")
    return args


def match_vocabulary(args: ModelArgs, tokenizer: Tokenizer | None, ckpt_dir: Path):
    """Take vocab_size from the tokenizer where params.json leaves it -1 (LLaMA 1); a tokenizer
    whose size differs from the checkpoint's is an error, not ids past the embedding."""
    if args.vocab_size == -1:
        if tokenizer is None:
            raise FileNotFoundError(f"{ckpt_dir}/params.json: vocab_size is -1 and there is no tokenizer.model")
        args.vocab_size = tokenizer.n_words
    if tokenizer is not None and tokenizer.n_words != args.vocab_size:
        raise ValueError(f"{tokenizer.path}: tokenizer has {tokenizer.n_words} tokens but the checkpoint "
                         f"in {ckpt_dir} has vocab_size {args.vocab_size}")


def check_weights(state: dict[str, torch.Tensor], expected: dict[str, torch.Size], ckpt_dir: Path):
    """Exactly the model's weights, each of the shape its config gives."""
    for name, tensor in state.items():
        if name not in expected:
            raise ValueError(f"{ckpt_dir}: unexpected weight {name!r}")
        if tensor.shape != expected[name]:
            raise ValueError(f"{ckpt_dir}: {name} has shape {tuple(tensor.shape)}, the config says {tuple(expected[name])}")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{ckpt_dir}: missing weights {missing[:5]}")


def find_tokenizer(ckpt_dir: Path) -> Tokenizer | None:
    """tokenizer.model or an HF tokenizer.json beside the weights, else tokenizer.model one folder
    up (Meta's download puts it there). An HF Llama 2 folder holds both files: the first wins."""
    for candidate in (ckpt_dir / "tokenizer.model", ckpt_dir / "tokenizer.json", ckpt_dir.parent / "tokenizer.model"):
        if candidate.is_file():
            return Tokenizer(candidate)
    return None


# Meta's layout: params.json (ModelArgs.from_params_json) and consolidated.*.pth shards.


def read_meta_weights(ckpt_dir: Path, expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Every shard of `meta_shards`, model-parallel shards merged per weight.

    Meta splits wq, wk, wv, w1, w3 and output along dim 0, wo and w2 along dim 1, the embedding
    along dim 1 (LLaMA 1/2) or dim 0 (Llama 3), and replicates the norms. The split dimension is
    therefore the one dimension where a shard is smaller than the full weight, which is how it
    is found here; anything else is a shard count or shape that does not fit params.json.
    """
    shards = meta_shards(ckpt_dir)
    parts = [read_tensor_file(s) for s in shards]
    state = {}
    for name, full in expected.items():
        pieces = []
        for shard, part in zip(shards, parts):
            if name not in part:
                raise ValueError(f"{shard}: missing weight {name!r}")
            pieces.append(part[name])
        state[name] = merge_shards(name, pieces, full, shards)
    for shard, part in zip(shards, parts):
        extra = sorted(set(part) - set(expected) - {"rope.freqs"})  # rope.freqs is recomputed
        if extra:
            raise ValueError(f"{shard}: unexpected weights {extra[:5]} for params.json")
    return state


def meta_shards(ckpt_dir: Path) -> list[Path]:
    """The shards: files named exactly consolidated.NN.pth, numbered 00 to K-1 without a gap.
    Other names the loose pattern consolidated.*.pth would take (consolidated.00.backup.pth, a
    copy) are ignored; a gap in the numbers is an error."""
    numbered = {int(m.group(1)): f for f in ckpt_dir.glob("consolidated.*.pth")
                if (m := re.fullmatch(r"consolidated\.(\d\d)\.pth", f.name))}
    if not numbered:
        raise FileNotFoundError(f"{ckpt_dir}: params.json but no consolidated.NN.pth shards")
    gaps = sorted(set(range(max(numbered) + 1)) - set(numbered))
    if gaps:
        raise ValueError(f"{ckpt_dir}: shards {', '.join(f'{i:02d}' for i in sorted(numbered))} but no "
                         f"consolidated.{gaps[0]:02d}.pth: Meta's shards are numbered 00 to K-1 without a gap")
    return [numbered[i] for i in range(len(numbered))]


def merge_shards(name, pieces, full: torch.Size, shards) -> torch.Tensor:
    shape = pieces[0].shape
    if shape == full and (len(pieces) == 1 or len(full) == 1):  # a single shard, or the replicated norms
        if any(not torch.equal(p, pieces[0]) for p in pieces[1:]):
            raise ValueError(f"{shards[0].parent}: {name} is replicated in every shard but the shards differ")
        return pieces[0]
    split = [d for d in range(len(full)) if shape[d] * len(pieces) == full[d]
             and all(shape[o] == full[o] for o in range(len(full)) if o != d)]
    if len(shape) != len(full) or not split or any(p.shape != shape for p in pieces):
        raise ValueError(f"{shards[0].parent}: {name} has shard shape {tuple(shape)} x {len(pieces)} shards, "
                         f"which does not make {tuple(full)} from params.json")
    return torch.cat(pieces, dim=split[0])


def read_tensor_file(file: Path, data: bytes | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a regular .safetensors file (or of `data`, its bytes already read), or of a
    .pth/.bin file read with weights_only (never unpickling anything that could run code). Only
    floating-point tensors: weights are never int8, bool or int64, and cast to float they would
    compute something silently wrong."""
    if data is None:
        regular_file(file)
    try:
        from safetensors.torch import load, load_file

        if data is not None or file.suffix == ".safetensors":
            tensors = load_file(str(file)) if data is None else load(data)
        else:
            tensors = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # the libraries raise many types; the user needs the file name
        raise ValueError(f"{file}: cannot read weights: {e}") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise ValueError(f"{file}: not a file of named tensors")
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{file}: {key} is {str(tensor.dtype).removeprefix('torch.')}; weights are floating point")
    return tensors


def weights_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A cheap fingerprint of a base model's weights: a hash of the first 64 values of every
    weight, as float32 (a bf16 file and its exact fp32 upcast agree). An adapter records it, so
    loading the adapter onto another base of the same shape is noticed."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].flatten()[:64].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# The --device, --precision and --ckpt flags of train.py, eval.py and bench.py


# The --precision of train.py, eval.py and bench.py: the dtype of the frozen weights. bf16 is the
# CUDA recipe (with fp32 adapters and bf16 autocast in training, train.autocast); it runs the same
# on a CPU, only slower. fp32 is the CPU default.
PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}


def default_precision(device) -> str:
    """bf16 on CUDA, fp32 elsewhere."""
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def resolve_device(name: str | None) -> torch.device:
    """`--device NAME` (default: cuda when available); a device torch cannot use here is a
    ValueError naming the flag, not a traceback at the first tensor moved there."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available to torch here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def resolve_checkpoint(name) -> Path:
    """`--ckpt NAME`: the folder checkpoints/NAME, else NAME itself as a path."""
    for candidate in (Path("checkpoints") / name, Path(name)):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"checkpoint {name!r}: neither checkpoints/{name}/ nor {name}/ is a folder "
                            f"(put params.json, consolidated.NN.pth and tokenizer.model there)")
