"""LLaMA 1, 2 and 3 in plain PyTorch: the model, its tokenizers, checkpoint loading, decoding.

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
"""

import base64
import hashlib
import json
import math
import re
import types
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------
# Configuration

# The --precision of train.py, eval.py and bench.py: the dtype of the frozen weights. bf16 is the
# CUDA recipe (with fp32 adapters and bf16 autocast in training, train.autocast); it runs the same
# on a CPU, only slower. fp32 is the CPU default.
PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}


def default_precision(device) -> str:
    """bf16 on CUDA, fp32 elsewhere."""
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


@dataclass
class ModelArgs:
    """The fields of Meta's params.json (plus `ffn_hidden_dim` for HF configs, which state it)."""

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
        return cls(**params)


# --------------------------------------------------------------------------------------------
# The model


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
    """Complex rotations e^{i * pos * theta_k}: (2 * max_seq_len, head_dim / 2), complex64."""
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
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B, T, H, head_dim/2)
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
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, rotations), apply_rope(k, rotations)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, head_dim)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, n_kv_heads, T_past + T, head_dim)
        # No mask means a plain causal batch (right padding never reaches a real token), which
        # lets SDPA pick its fastest kernel.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)

    def forward(self, x):
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
        return self.rope[positions]  # (B, T, head_dim / 2) complex64

    def trunk(self, tokens, positions=None, mask=None, caches=None, collect=()):
        """The final normed hidden states (B, T, dim), and the residual stream leaving each block
        in `collect` (1-based block numbers: h_l is the state between block l and l + 1).

        tokens: (B, T). positions: (B, T) absolute positions (default 0..T-1, or after the
        cache's length). mask: (B, 1, T, T_past + T) bool, True = may attend; None = causal.
        caches: one KVCache per block, or None.
        """
        if positions is None:
            start = 0 if caches is None or caches[0].k is None else caches[0].k.shape[2]
            positions = torch.arange(start, start + tokens.shape[1], device=tokens.device).expand_as(tokens)
        rotations = self.rotations(positions)
        h = self.tok_embeddings(tokens)  # (B, T, dim)
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
        """Logits (B, T, vocab_size)."""
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


@torch.no_grad()
def prefill(model: Transformer, prompts: list[list[int]], max_new_tokens: int, pad_id: int = 0):
    """Run left-padded prompts through the model once, filling fresh KV caches with room for
    `max_new_tokens` more positions.

    Left padding puts every sample's next token in the last column; positions count only real
    tokens and the mask hides the padding, so a batch decodes exactly like one prompt at a time.
    Returns the last position's logits (B, vocab) (never the (B, T, vocab) of every position),
    the caches, the key mask (B, T) and each sample's next position (B,).
    """
    tokens, valid = left_pad(prompts, pad_id, model.output.weight.device)
    positions = (valid.cumsum(1) - 1).clamp(min=0)
    caches = model.new_caches()
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
# Tokenizers


# Llama 3's pre-tokenizer split pattern (Meta's release).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NAMED_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
]
LLAMA3_N_SPECIALS = 256

# GPT-2's split pattern: what an HF ByteLevel pre-tokenizer with `use_regex` splits a text by.
GPT2_SPLIT_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# An HF Digits(individual_digits) step, then GPT-2's pattern on the stretches between the digits
# (SmolLM2's and StarCoder's hub files), as one regex: every digit is a piece of its own, and a
# digit ends a whitespace run the way the end of a stretch does.
DIGITS_GPT2_SPLIT_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"
# Added tokens that end a reply in these families' formats: decoding stops at whichever exist.
END_OF_TURN_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|end_of_text|>", "<|eot_id|>")


class Tokenizer:
    """One interface over three files: LLaMA 1/2's SentencePiece model, Llama 3's tiktoken BPE
    file, and an HF byte-level BPE tokenizer.json (SmolLM2, Llama 3 hub downloads).

    The backend is chosen by sniffing the file: a tokenizer.json is a JSON object; Llama 3's
    tokenizer.model is text lines of `base64(token) rank`; LLaMA 1/2's is a binary SentencePiece
    protobuf.

    `encode(text, bos=True)` puts in front what the model's own tokenizer puts there when the
    commonsense recipe encodes a prompt: BOS for the two tokenizer.model files; for a
    tokenizer.json, what transformers adds by the same files (`add_bos`). SmolLM2's files add
    nothing, so its prompts start without a BOS, exactly as in transformers.
    """

    def __init__(self, path):
        self.path = Path(path)
        try:
            head = self.path.open("rb").read(256)
        except OSError as e:
            raise FileNotFoundError(f"{self.path}: cannot read tokenizer: {e}") from None
        self.add_bos = True
        if head.lstrip().startswith(b"{"):
            self._init_tokenizer_json()
        elif re.match(rb"[A-Za-z0-9+/=]+ \d+\r?\n", head):
            self._init_tiktoken()
        else:
            self._init_sentencepiece()

    def _init_sentencepiece(self):
        import sentencepiece

        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{self.path}: not a SentencePiece model, tiktoken BPE file or tokenizer.json: "
                             f"{e}") from None
        self.n_words = self.sp.vocab_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        # SentencePiece LLaMA has no pad token; id 0 (<unk>) is what the commonsense recipe pads with.
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0
        self.stop_ids = {self.eos_id}
        self._encode = self.sp.encode
        self._decode = self.sp.decode

    def _init_tiktoken(self):
        import tiktoken

        ranks = {}
        with self.path.open("rb") as f:
            for n, line in enumerate(f, 1):
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
                except ValueError:
                    raise ValueError(f"{self.path}:{n}: expected 'base64 rank', found {line[:60]!r}") from None
        names = LLAMA3_NAMED_SPECIALS + [f"<|reserved_special_token_{i}|>"
                                         for i in range(2, 2 + LLAMA3_N_SPECIALS - len(LLAMA3_NAMED_SPECIALS))]
        specials = {name: len(ranks) + i for i, name in enumerate(names)}
        self.tt = tiktoken.Encoding(name=self.path.name, pat_str=LLAMA3_SPLIT_PATTERN,
                                    mergeable_ranks=ranks, special_tokens=specials)
        self.n_words = self.tt.n_vocab
        self.bos_id, self.eos_id = specials["<|begin_of_text|>"], specials["<|end_of_text|>"]
        self.pad_id = specials["<|finetune_right_pad_id|>"]
        self.stop_ids = {self.eos_id, specials["<|eot_id|>"]}
        # Special-token text in user data is encoded as ordinary text, never as control tokens.
        self._encode = lambda text: self.tt.encode(text, disallowed_special=())
        self._decode = self.tt.decode

    def _init_tokenizer_json(self):
        """Run an HF byte-level BPE tokenizer.json with tiktoken: the vocabulary gives the ranks,
        the pre-tokenizer the split regex, the added tokens the specials; tokenizer_config.json
        and config.json beside it name BOS, EOS and pad."""
        import tiktoken

        spec = read_json(self.path)
        if spec.get("normalizer") is not None:
            raise ValueError(f"{self.path}: normalizer {spec['normalizer'].get('type')!r} is not implemented "
                             f"(a byte-level BPE tokenizer.json has none)")
        pattern = byte_level_split_pattern(spec.get("pre_tokenizer"), self.path)
        specials = {token["content"]: token["id"] for token in spec.get("added_tokens", [])}
        ranks = byte_level_ranks(spec.get("model", {}), set(specials.values()), self.path)
        self.n_words = 1 + max([*ranks.values(), *specials.values()])
        # transformers drops a byte its vocabulary lacks (SmolLM2's lacks 21 that text hardly
        # holds: six control characters, and bytes UTF-8 never or all but never uses). tiktoken
        # needs a rank for every byte: such a byte gets one past the vocabulary, and encode drops
        # it. One difference is left: transformers drops the byte before merging, so the bytes
        # around it may merge, which here they cannot.
        missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
        ranks.update({byte: self.n_words + i for i, byte in enumerate(missing)})
        self.tt = tiktoken.Encoding(name=str(self.path), pat_str=pattern, mergeable_ranks=ranks,
                                    special_tokens=specials)

        folder = self.path.parent
        tokenizer_config, config = (read_json(folder / name) if (folder / name).is_file() else {}
                                    for name in ("tokenizer_config.json", "config.json"))
        names = {**spec["model"]["vocab"], **specials}
        self.bos_id = hf_token_id("bos", tokenizer_config, config, names, folder)
        prefix = hf_bos_prefix(spec.get("post_processor"), tokenizer_config, self.bos_id, self.path)
        self.add_bos = prefix is not None
        self.bos_id = prefix if self.add_bos else self.bos_id
        self.eos_id = hf_token_id("eos", tokenizer_config, config, names, folder)
        if self.eos_id is None:
            raise ValueError(f"{self.path}: no EOS token: neither tokenizer_config.json's eos_token "
                             f"nor config.json's eos_token_id in {folder}")
        pad_id = hf_token_id("pad", tokenizer_config, config, names, folder)
        self.pad_id = self.eos_id if pad_id is None else pad_id  # padding is masked: any id serves
        config_eos = config.get("eos_token_id")
        self.stop_ids = ({self.eos_id} | set(config_eos if isinstance(config_eos, list) else [])
                         | {specials[name] for name in END_OF_TURN_TOKENS if name in specials})
        # Special-token text in user data is encoded as ordinary text, never as control tokens.
        self._encode = lambda text: [t for t in self.tt.encode(text, disallowed_special=()) if t < self.n_words]
        self._decode = self.tt.decode

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return [self.bos_id] * (bos and self.add_bos) + self._encode(text) + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return self._decode(list(ids))


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read JSON: {e}") from None


def check_json_types(path: Path, values: dict, expected: dict):
    """Each present key of `values` has its `expected` type (a type, or a union such as
    `int | None`): a string where a number belongs would otherwise fail later, far from the
    file. An int is a float here, as JSON writes 1e4 as 10000; a bool is never an int."""
    for key, annotation in expected.items():
        if key not in values:
            continue
        allowed = annotation.__args__ if isinstance(annotation, types.UnionType) else (annotation,)
        allowed = tuple(t for t in allowed if isinstance(t, type))
        if float in allowed:
            allowed += (int,)
        value = values[key]
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed if t is not int or float not in allowed)
            raise ValueError(f"{path}: {key!r} is {json.dumps(value)}, expected {names}")


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character a token string spells a byte with ->
    that byte. Printable Latin-1 bytes are their own character; the other 68 (controls, space,
    0x7F-0xA0, 0xAD) are U+0100 onwards in byte order, so a token string never holds whitespace
    ("Ġ" is the space)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    alphabet = {chr(b): b for b in printable}
    alphabet.update({chr(0x100 + i): b for i, b in enumerate(b for b in range(256) if b not in printable)})
    return alphabet


def byte_level_split_pattern(pre_tokenizer: dict | None, path: Path) -> str:
    """The regex tiktoken splits a text by, from a tokenizer.json's byte-level pre-tokenizer.

    Three forms are implemented: ByteLevel with `use_regex` (GPT-2's pattern); Digits with
    individual digits, then that ByteLevel (SmolLM2's hub file); a Split regex, then ByteLevel
    without its own regex (Llama 3's hub files: the Split pattern). A Split pattern here must
    match every character, as these do: tiktoken drops what no match covers, transformers keeps it.
    """
    steps = pre_tokenizer.get("pretokenizers", [pre_tokenizer]) if pre_tokenizer else []
    kinds = [step.get("type") for step in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" and not steps[-1].get("add_prefix_space") else None
    if byte_level is not None:
        own_regex = byte_level.get("use_regex", True)
        if kinds == ["ByteLevel"] and own_regex:
            return GPT2_SPLIT_PATTERN
        if kinds == ["Digits", "ByteLevel"] and own_regex and steps[0].get("individual_digits"):
            return DIGITS_GPT2_SPLIT_PATTERN
        split = steps[0]
        if (kinds == ["Split", "ByteLevel"] and not own_regex and "Regex" in split.get("pattern", {})
                and split.get("behavior") == "Isolated" and not split.get("invert")):
            return split["pattern"]["Regex"]
    raise ValueError(f"{path}: pre_tokenizer {json.dumps(pre_tokenizer)[:300]} is not implemented; expected "
                     f"ByteLevel (use_regex, no prefix space), Digits (individual) then ByteLevel, or an "
                     f"isolating Split regex then ByteLevel (no use_regex)")


def byte_level_ranks(model: dict, added_ids: set[int], path: Path) -> dict[bytes, int]:
    """tiktoken's mergeable ranks from an HF byte-level BPE model: each token's bytes -> its id.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank, HF BPE the pair
    listed first among the merges, so the ids must grow in merge order (equal ids for several
    merges of one token, as transformers' conversion of a tiktoken file lists them), and every
    token beyond the single bytes must be some merge's result: both are checked.
    """
    if (model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix")
            or model.get("end_of_word_suffix")):
        raise ValueError(f"{path}: model {model.get('type')!r} is not a plain byte-level BPE "
                         f"(byte_fallback, subword prefixes and suffixes are not implemented)")
    alphabet = byte_level_alphabet()
    vocab = {token: i for token, i in model["vocab"].items() if i not in added_ids}
    try:
        ranks = {bytes(alphabet[c] for c in token): i for token, i in vocab.items()}
    except KeyError as e:
        raise ValueError(f"{path}: vocabulary character {e} is outside GPT-2's byte-level alphabet; "
                         f"not a byte-level BPE") from None
    previous, merged = -1, set()
    for n, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        rank = vocab.get(left + right)
        if rank is None:
            raise ValueError(f"{path}: merge {n} ({left!r}, {right!r}) makes a token the vocabulary lacks")
        if rank < previous:
            raise ValueError(f"{path}: merge {n} ({left!r}, {right!r}) makes id {rank}, after id {previous}: "
                             f"the ids must grow in merge order for tiktoken's ranks")
        previous = rank
        merged.add(left + right)
    unmerged = [token for token in vocab if len(token) > 1 and token not in merged]
    if unmerged:
        raise ValueError(f"{path}: {len(unmerged)} tokens are no merge's result (e.g. {unmerged[0]!r})")
    return ranks


def hf_token_id(kind: str, tokenizer_config: dict, config: dict, names: dict[str, int], folder: Path) -> int | None:
    """The id of tokenizer_config.json's `<kind>_token` (a string, or an object with "content"),
    else config.json's `<kind>_token_id` (the first where it lists several), else None."""
    token = tokenizer_config.get(f"{kind}_token")
    token = token.get("content") if isinstance(token, dict) else token
    if token is not None:
        if token not in names:
            raise ValueError(f"{folder / 'tokenizer_config.json'}: {kind}_token {token!r} is not in the vocabulary")
        return names[token]
    ids = config.get(f"{kind}_token_id")
    return ids[0] if isinstance(ids, list) else ids


def hf_bos_prefix(post_processor: dict | None, tokenizer_config: dict, bos_id: int | None, path: Path) -> int | None:
    """The id transformers (5.x) puts in front of every text it encodes, or None.

    Its rule: tokenizer_config.json's add_bos_token where it is given (the template is rebuilt
    from it), else the template of the tokenizer.json post-processor. Tokens after the text
    (add_eos_token, a template ending in a token) are not implemented.
    """
    if tokenizer_config.get("add_eos_token"):
        raise ValueError(f"{path.parent / 'tokenizer_config.json'}: add_eos_token is not implemented")
    if "add_bos_token" in tokenizer_config:
        return bos_id if tokenizer_config["add_bos_token"] else None
    processors = (post_processor or {}).get("processors", [post_processor] if post_processor else [])
    unknown = {p.get("type") for p in processors} - {"ByteLevel", "TemplateProcessing"}
    templates = [p for p in processors if p.get("type") == "TemplateProcessing"]
    pieces = [item["SpecialToken"]["id"] if "SpecialToken" in item else "$A" for item in
              (templates[0].get("single", []) if templates else [{"Sequence": {}}])]
    if unknown or len(templates) > 1 or pieces not in (["$A"], [*pieces[:1], "$A"]):
        raise ValueError(f"{path}: post_processor {json.dumps(post_processor)[:300]} is not implemented; "
                         f"expected ByteLevel and at most a template of one token before the text")
    return templates[0]["special_tokens"][pieces[0]]["ids"][0] if len(pieces) == 2 else None


# --------------------------------------------------------------------------------------------
# Checkpoints


def hf_to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo HF's q/k row order (rotate-half pairs i, i + d/2) back to Meta's adjacent pairs."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def meta_to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's adjacent-pair q/k rows in HF's rotate-half order (what HF's converter does)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


HF_TO_META_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
HF_TO_META_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}


def hf_key_to_meta(key: str) -> str | None:
    """Meta's name for an HF LlamaForCausalLM key; None for keys that carry no weights."""
    if key in HF_TO_META_NAMES:
        return HF_TO_META_NAMES[key]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", key)
    if m and m.group(2) in HF_TO_META_LAYER_NAMES:
        return f"layers.{m.group(1)}.{HF_TO_META_LAYER_NAMES[m.group(2)]}.weight"
    if key.endswith("rotary_emb.inv_freq"):  # recomputed, older HF files stored it
        return None
    raise ValueError(f"unexpected HF LLaMA weight {key!r}")


# The types of the HF config.json keys read_hf_config reads.
HF_CONFIG_TYPES = {
    "hidden_size": int, "num_hidden_layers": int, "num_attention_heads": int, "num_key_value_heads": int | None,
    "vocab_size": int, "intermediate_size": int, "head_dim": int | None, "rms_norm_eps": float, "rope_theta": float,
    "max_position_embeddings": int, "tie_word_embeddings": bool, "hidden_act": str,
}


def read_hf_config(path: Path) -> tuple[ModelArgs, bool]:
    """ModelArgs from an HF config.json, and whether the output is tied to the embedding.

    Anything this model cannot compute exactly is an error, not a silent difference.
    """
    cfg = read_json(path)
    if cfg.get("model_type") != "llama" or any(a != "LlamaForCausalLM" for a in cfg.get("architectures") or []):
        raise ValueError(f"{path}: model_type {cfg.get('model_type')!r}, architectures {cfg.get('architectures')}: "
                         "only LLaMA checkpoints (model_type 'llama', LlamaForCausalLM) load here")
    if cfg.get("sliding_window") or cfg.get("use_sliding_window"):
        raise ValueError(f"{path}: sliding-window attention is not a LLaMA feature this model implements")
    check_json_types(path, cfg, HF_CONFIG_TYPES)
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ValueError(f"{path}: {flag}=true is not a LLaMA feature this model implements")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: hidden_act {cfg['hidden_act']!r}, expected 'silu'")
    rope = dict(cfg.get("rope_parameters") or {})  # transformers 5 nests theta and scaling here
    scaling = cfg.get("rope_scaling") or rope
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"{path}: rope type {rope_type!r} is not implemented (only default and llama3)")
    if rope_type == "llama3":
        expected = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}
        found = {k: scaling.get(k) for k in expected}
        if found != expected:
            raise ValueError(f"{path}: llama3 rope scaling {found}, only Llama 3.1's {expected} is implemented")
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    if head_dim * cfg["num_attention_heads"] != cfg["hidden_size"]:
        raise ValueError(f"{path}: head_dim {head_dim} x heads != hidden_size; not implemented")
    args = ModelArgs(
        dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
        n_kv_heads=cfg.get("num_key_value_heads"), vocab_size=cfg["vocab_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
        use_scaled_rope=rope_type == "llama3", max_seq_len=cfg.get("max_position_embeddings", 2048),
        ffn_hidden_dim=cfg["intermediate_size"],
    )
    return args, bool(cfg.get("tie_word_embeddings", False))


def read_hf_weights(ckpt_dir: Path, args: ModelArgs, tied: bool) -> dict[str, torch.Tensor]:
    """Meta-named weights from the files of `hf_weight_files`, q/k rows un-permuted."""
    files = hf_weight_files(ckpt_dir)
    state = {}
    for file in files:
        for key, tensor in read_tensor_file(file).items():
            try:
                name = hf_key_to_meta(key)
            except ValueError as e:
                raise ValueError(f"{file}: {e}") from None
            if name is None:
                continue
            if name.endswith("attention.wq.weight"):
                tensor = hf_to_meta_rows(tensor, args.n_heads)
            elif name.endswith("attention.wk.weight"):
                tensor = hf_to_meta_rows(tensor, args.kv_heads)
            state[name] = tensor
    if tied and "output.weight" not in state and "tok_embeddings.weight" in state:
        state["output.weight"] = state["tok_embeddings.weight"].clone()  # the model stays untied
    return state


def hf_weight_files(ckpt_dir: Path) -> list[Path]:
    """Exactly the files an HF folder's index lists (model.safetensors.index.json), or its single
    model.safetensors (then the same for pytorch_model.bin): never every *.safetensors in the
    folder, where a stray copy would silently replace the real weights."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (ckpt_dir / index).is_file():
            weight_map = read_json(ckpt_dir / index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise ValueError(f"{ckpt_dir / index}: 'weight_map' is not a mapping of weight names to file names")
            files = [ckpt_dir / name for name in sorted(set(weight_map.values()))]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise FileNotFoundError(f"{ckpt_dir / index}: lists {absent} but they are not in the folder")
            return files
        if (ckpt_dir / single).is_file():
            return [ckpt_dir / single]
    raise FileNotFoundError(f"{ckpt_dir}: config.json but no model.safetensors, model.safetensors.index.json, "
                            "pytorch_model.bin or pytorch_model.bin.index.json")


def weights_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A cheap fingerprint of a base model's weights: a hash of the first 64 values of every
    weight, as float32 (a bf16 file and its exact fp32 upcast agree). An adapter records it, so
    loading the adapter onto another base of the same shape is noticed."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].flatten()[:64].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def read_tensor_file(file: Path) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # the libraries raise many types; the user needs the file name
        raise ValueError(f"{file}: cannot read weights: {e}") from None


def read_meta_weights(ckpt_dir: Path, expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Every consolidated.*.pth, model-parallel shards merged per weight.

    Meta splits wq, wk, wv, w1, w3 and output along dim 0, wo and w2 along dim 1, the embedding
    along dim 1 (LLaMA 1/2) or dim 0 (Llama 3), and replicates the norms. The split dimension is
    therefore the one dimension where a shard is smaller than the full weight, which is how it
    is found here; anything else is a shard count or shape that does not fit params.json.
    """
    shards = sorted(ckpt_dir.glob("consolidated.*.pth"))
    if not shards:
        raise FileNotFoundError(f"{ckpt_dir}: params.json but no consolidated.*.pth shards")
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


def merge_shards(name, pieces, full: torch.Size, shards) -> torch.Tensor:
    shape = pieces[0].shape
    if shape == full:
        return pieces[0]  # replicated (norms), or a single shard
    split = [d for d in range(len(full)) if shape[d] * len(pieces) == full[d]
             and all(shape[o] == full[o] for o in range(len(full)) if o != d)]
    if len(shape) != len(full) or not split or any(p.shape != shape for p in pieces):
        raise ValueError(f"{shards[0].parent}: {name} has shard shape {tuple(shape)} x {len(pieces)} shards, "
                         f"which does not make {tuple(full)} from params.json")
    return torch.cat(pieces, dim=split[0])


def find_tokenizer(ckpt_dir: Path) -> Tokenizer | None:
    """tokenizer.model or an HF tokenizer.json beside the weights, else tokenizer.model one folder
    up (Meta's download puts it there). An HF Llama 2 folder holds both files: the first wins."""
    for candidate in (ckpt_dir / "tokenizer.model", ckpt_dir / "tokenizer.json", ckpt_dir.parent / "tokenizer.model"):
        if candidate.is_file():
            return Tokenizer(candidate)
    return None


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
                            f"(put params.json, consolidated.*.pth and tokenizer.model there)")


def load(ckpt_dir, device="cpu", dtype=torch.bfloat16) -> tuple[Transformer, Tokenizer | None]:
    """A Meta checkpoint folder (params.json + consolidated.*.pth) or an HF LLaMA folder
    (config.json + *.safetensors), as (model in eval mode, tokenizer or None).

    The model is built on the meta device and takes the loaded tensors as its parameters, so no
    randomly initialised or fp32 copy of the whole model is ever made.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"{ckpt_dir}: checkpoint folder not found")
    tokenizer = find_tokenizer(ckpt_dir)
    meta_layout = (ckpt_dir / "params.json").is_file()
    if meta_layout:
        args = ModelArgs.from_params_json(ckpt_dir / "params.json")
    elif (ckpt_dir / "config.json").is_file():
        args, tied = read_hf_config(ckpt_dir / "config.json")
    else:
        raise FileNotFoundError(f"{ckpt_dir}: no params.json (Meta layout) or config.json (HF layout)")
    if args.vocab_size == -1:
        if tokenizer is None:
            raise FileNotFoundError(f"{ckpt_dir}/params.json: vocab_size is -1 and there is no tokenizer.model")
        args.vocab_size = tokenizer.n_words
    if tokenizer is not None and tokenizer.n_words != args.vocab_size:
        raise ValueError(f"{tokenizer.path}: tokenizer has {tokenizer.n_words} tokens but the checkpoint "
                         f"in {ckpt_dir} has vocab_size {args.vocab_size}")
    with torch.device("meta"):
        model = Transformer(args)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state = read_meta_weights(ckpt_dir, expected) if meta_layout else read_hf_weights(ckpt_dir, args, tied)
    for name, tensor in state.items():
        if name not in expected:
            raise ValueError(f"{ckpt_dir}: unexpected weight {name!r}")
        if tensor.shape != expected[name]:
            raise ValueError(f"{ckpt_dir}: {name} has shape {tuple(tensor.shape)}, the config says {tuple(expected[name])}")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{ckpt_dir}: missing weights {missing[:5]}")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)
    model.rope = rope_frequencies(args, device=device)  # built on the meta device above
    model.fingerprint = weights_fingerprint(state)  # of the file's values, before the cast to `dtype`
    return model.eval(), tokenizer
