"""Echo-LoRA, the method: low-rank adapters (LoRA, DoRA) on a LLaMA, and the training-only Echo path.

    "Echo-LoRA: Parameter-Efficient Fine-Tuning via Cross-Layer Representation Injection",
    arXiv 2605.08177 (2026). Only its abstract is public: METHOD.md defines what this file
    computes, and the code cites it as "METHOD.md item N".

One training step (LLaMA-7B, 16 samples of 256 tokens, rank r 32, route p 0.5: about 8 routed):

  tokens (16, 256)
    |
    v
  plain pass: the model and its LoRA/DoRA adapters (deployed) ----------> z_plain --> CE(z_plain)
    |  h_l leaving the source layers S (item 1), the deepest quarter:     |
    |  blocks 25..32, each (16, 256, 4096), detached                      |
    v                                                                     |
  echo representation e (item 2): mean over S, then over the prompt       |
    |  positions 0..b-1, rms_norm: (8, 4096), routed samples only         |
    v                                                                     |
  projection P e (8, 32) and gate g(e) (8,), one pair per target          |  masked distillation
    |  (item 4)                                                           |  (item 7): KL between
    v                                                                     |  the two, on answer
  targets (item 3): the shallow adapters, blocks 1..8, q k v up down:     |  tokens only
    |  u = A x + m_t g(e) P e, m_t = 1 at the answer positions only       |
    v                                                                     |
  echo pass (item 6) of the samples routed (item 5): the answer           |
     suffix, attending to the plain pass's prefix keys and values ------> z_echo ---> CE(z_echo)

  loss = CE(z_plain) + [routed] ( CE(z_echo) + lambda tau^2 KL(z_echo.detach() || z_plain) )   (item 7)

After training the Echo path is discarded (item 8): the saved adapter is a plain LoRA/DoRA adapter.
Reading order: the adapter, the Echo path item by item ending in `loss_terms`, the adapter as
saved and loaded, then two speed kernels (nn.Dropout's and the output layer's cross-entropy).

    Hu et al. 2021, "LoRA", section 4.1: h = W0 x + (alpha / r) B A x, B zero at the start.
    Liu et al. 2024, "DoRA", section 4.1, eq. (5): W' = m (W0 + B A) / ||W0 + B A||_c, m starting
    at ||W0||_c; section 4.3: the norm detached. ||.||_c is, in PyTorch's (out, in) layout, each
    output row's norm.
"""

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from data.adapters import (ADAPTER_FILE, CONFIG_FILE, check_adapter_files, check_base_model, check_fit,
                           copy_adapter_tensors, read_adapter_config, read_adapter_tensors, write_adapter)
from data.batches import Batch
from data.commonsense import IGNORE_INDEX
from llama import KVCache

# The block linears an adapter can wrap: Meta's name -> its path inside a block
BLOCK_LINEARS = {"wq": "attention.wq", "wk": "attention.wk", "wv": "attention.wv", "wo": "attention.wo",
                 "w1": "feed_forward.w1", "w2": "feed_forward.w2", "w3": "feed_forward.w3"}
# q, k, v, up, down: the commonsense recipe of LLM-Adapters and the DoRA paper.
DEFAULT_TARGETS = ("wq", "wk", "wv", "w3", "w2")
NORM_FLOOR = 1e-12  # a zero row's output is 0 whatever it is divided by: the floor keeps 0 / 0 from NaN


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update (LoRA), optionally weight-decomposed (DoRA).

    Adapter parameters are fp32 whatever the base weight's dtype (lr * grad vanishes in bf16).
    In training, DoRA with dropout computes what peft computes,

        W x + (m / ||V|| - 1) W drop(x) + (m / ||V||) s B A drop(x),    V = W + s B A,

    one more product with W than LoRA; `adapter_only_dropout` (--adapter-only-dropout, a departure)
    computes (m / ||V||)(W x + s B A drop(x)), reusing W x. Without dropout the two are the same.

    `injection` and `up_injection`: the Echo path's hooks (METHOD.md item 4), None or a callable of
    u (..., r) whose term is added to u, or to B u (--echo-up own). Never in the norm, merge or file.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, dora: bool = False,
                 adapter_only_dropout: bool = False):
        super().__init__()
        if base.bias is not None:
            raise ValueError("LoRALinear wraps bias-free linears (LLaMA has no biases)")
        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.dora = r, alpha, dora
        self.scale = alpha / r  # LoRA section 4.1
        weight = base.weight
        # A: kaiming-uniform like loralib/peft (the paper: Gaussian); B: zeros, so training starts at the base
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=weight.device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=weight.device, dtype=torch.float32))
        self.dropout = Dropout(dropout)
        self.adapter_only_dropout = adapter_only_dropout
        self.injection = self.up_injection = None
        if dora:
            # ||W_o||^2 per row, computed once (W is frozen); derived, so not saved, and refreshed on load
            self.register_buffer("base_norm_sq", torch.empty(0), persistent=False)
            self.refresh_base_norm()
            self.register_load_state_dict_post_hook(lambda module, _: module.refresh_base_norm())
            # DoRA section 4.1: m starts at ||W0||_c, so the layer starts as the base layer.
            self.magnitude = nn.Parameter(self.base_norm_sq.sqrt())

    @torch.no_grad()
    def refresh_base_norm(self):
        """Recompute ||W_o||^2 (fp32) after the base weight changed (load_state_dict calls this)."""
        self.base_norm_sq = self.base.weight.float().pow(2).sum(1)  # (out,)

    def low_rank(self, dropped: torch.Tensor) -> torch.Tensor:
        """u = A drop(x) (+ the Echo path's injection): (16, 256, 4096) -> (16, 256, 32)."""
        if not torch.is_autocast_enabled(dropped.device.type):
            dropped = dropped.to(self.lora_A.dtype)  # the adapter computes in fp32 even on bf16 activations
        u = F.linear(dropped, self.lora_A)  # (..., r)
        if self.injection is not None:
            u = u + self.injection(u)
        return u

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base_out = self.base(x)  # W x, (..., out)
        dropped = self.dropout(x)  # one mask, shared by every term that reads drop(x)
        u = self.low_rank(dropped)
        low_rank_update = F.linear(u, self.lora_B)  # B u, (..., out)
        if self.up_injection is not None:  # METHOD.md item 4, --echo-up own
            low_rank_update = low_rank_update + self.up_injection(u)
        update = self.scale * low_rank_update  # s B u, (..., out)
        if not self.dora:
            return base_out + update.to(base_out.dtype)  # LoRA section 4.1
        direction_scale = self.magnitude / self.weight_norm()  # m / ||W + sBA||, (out,)
        if self.training and self.dropout.p > 0 and not self.adapter_only_dropout:
            # peft's DoRA under dropout: the magnitude's rescaling of W acts on drop(x), not x.
            rescaled = (direction_scale - 1) * self.base(dropped)
            return (base_out + rescaled + direction_scale * update).to(base_out.dtype)
        # DoRA eq. (5) applied to x: m / ||W + sBA|| * (W x + s B A drop(x)), reusing W x from above.
        return (direction_scale * (base_out + update)).to(base_out.dtype)

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """||W_o + s (B A)_o|| for every output row o, (out,), fp32, detached (DoRA section 4.3),
        without forming the (out, in) matrix W + s B A:

            ||W_o + s (BA)_o||^2 = ||W_o||^2 + 2 s sum_k B_ok (W A^T)_ok + s^2 B_o (A A^T) B_o^T

        (precise unless the update nearly cancels a weight row, which fine-tuning never comes near).
        """
        with torch.autocast(self.lora_A.device.type, enabled=False):  # the norm stays fp32
            A, B, s = self.lora_A, self.lora_B, self.scale
            # W is upcast for this product alone: a bf16 product would round W A^T to 8 bits.
            weight_a = F.linear(self.base.weight.float(), A)  # (out, r)
            cross = (weight_a * B).sum(1)  # W_o . (BA)_o, (out,)
            update_sq = ((B @ (A @ A.T)) * B).sum(1)  # ||(BA)_o||^2, (out,)
            norm_sq = self.base_norm_sq + 2 * s * cross + s * s * update_sq
            return norm_sq.clamp_min(NORM_FLOOR**2).sqrt()

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + s B A (LoRA), m / ||W + s B A|| * (W + s B A) (DoRA eq. 5): formed in fp32, returned
        in the base weight's dtype."""
        weight = self.base.weight.float() + self.scale * (self.lora_B @ self.lora_A)  # (out, in)
        if self.dora:
            weight = (self.magnitude / self.weight_norm())[:, None] * weight
        return weight.to(self.base.weight.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, dropout={self.dropout.p}, dora={self.dora}"


# --------------------------------------------------------------------------------------------
# Attaching adapters to a model


def add_adapters(model: nn.Module, targets=DEFAULT_TARGETS, r: int = 32, alpha: float = 64, dropout: float = 0.05,
                 dora: bool = False, layers=None, adapter_only_dropout: bool = False) -> nn.Module:
    """Wrap the `targets` linears (wq, wk, wv, wo, w1, w2, w3) of the blocks `layers` (0-based; None:
    all) in LoRALinear, and freeze every other parameter."""
    if adapted_linears(model):
        raise ValueError("the model already has adapters; merge(model) or build a fresh model first")
    targets = list(dict.fromkeys(targets))  # a repeated name must not wrap a layer twice
    unknown = [t for t in targets if t not in BLOCK_LINEARS]
    if unknown or not targets:
        raise ValueError(f"unknown adapter targets {unknown or targets}; expected some of {list(BLOCK_LINEARS)}")
    n_blocks = len(model.layers)
    blocks = range(n_blocks) if layers is None else sorted(set(layers))
    outside = [i for i in blocks if not 0 <= i < n_blocks]
    if outside or not blocks:
        raise ValueError(f"adapter layers {outside or list(blocks)} are not blocks of this {n_blocks}-block model")
    model.requires_grad_(False)
    for i in blocks:
        for target in targets:
            parent_name, _, name = BLOCK_LINEARS[target].rpartition(".")
            parent = model.layers[i].get_submodule(parent_name)
            adapter = LoRALinear(getattr(parent, name), r, alpha, dropout, dora, adapter_only_dropout)
            setattr(parent, name, adapter.train(model.training))  # a new module would be in training mode
    return model


def adapted_linears(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear by its model path, e.g. 'layers.0.attention.wq'."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (the rest is frozen)."""
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain nn.Linear back, in place (LoRA
    section 4.1: no inference latency)."""
    for path, module in adapted_linears(model).items():
        module.base.weight.copy_(module.merged_weight())
        parent_name, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_name), name, module.base)
    return model


# --------------------------------------------------------------------------------------------
# The Echo path (METHOD.md items 1-8, in the method's order). The model never holds an Echo
# parameter: they live in an `EchoPath` beside it, plugged into the targets' `injection` hook only
# during the Echo pass, so dropping the EchoPath is the discard (item 8). Shapes: LLaMA-7B, r 32,
# 16 samples of 256 tokens, 8 routed, a 24-position answer suffix after a prefix of up to 232.


# The values of EchoConfig's choice fields: train.py's --echo-* choices
ECHO_CHOICES = {"pool": ("mean", "last"), "mask": ("answer", "none"), "echo_pass": ("suffix", "full"),
                "inject": ("echo", "zero"), "up": ("lora", "own")}


@dataclass
class EchoConfig:
    """METHOD.md's flags, checked where they are given (train.py's --echo-*). Blocks 1-based."""

    source_layers: tuple[int, ...] | None = None  # item 1; default: the deepest quarter of blocks
    target_layers: tuple[int, ...] | None = None  # item 3; default: the shallowest quarter of blocks
    pool: str = "mean"  # mean | last (item 2)
    route_p: float = 0.5  # item 5
    distill: float = 1.0  # lambda, item 7
    tau: float = 1.0  # distillation temperature, item 7
    mask: str = "answer"  # answer | none: the leaking ablation, needs echo_pass full (items 2, 4)
    echo_pass: str = "suffix"  # suffix | full (item 6)
    inject: str = "echo"  # echo | zero: the control, without the deep signal (item 4)
    up: str = "lora"  # lora | own: through the adapter's B, or its own U (item 4)
    lr_scale: float = 1.0  # the Echo path's multiple of the adapters' learning rate (item 4)


def default_layers(n_layers: int, which: str) -> tuple[int, ...]:
    """The deepest or the shallowest quarter of the blocks, 1-based (32 blocks: 25..32, 1..8)."""
    quarter = max(1, n_layers // 4)
    return tuple(range(n_layers - quarter + 1, n_layers + 1)) if which == "deep" else tuple(range(1, quarter + 1))


# ---- 1. Source layers


def source_states(states: dict[int, torch.Tensor], source_layers, rows: torch.Tensor) -> list[torch.Tensor]:
    """METHOD.md item 1: the routed samples' h_l as the plain pass collected them, each (8, 256, 4096),
    fp32 and detached: the Echo path never trains through the plain pass."""
    return [states[layer][rows].detach().float() for layer in source_layers]


# ---- 2. and 4. Answer-only masking


@dataclass
class AnswerOnlyMasks:
    """Where the Echo path reads and writes (METHOD.md items 2, 4). b-1: the last prompt position
    and the first answer position."""

    answer: torch.Tensor  # (8, 256) bool: the answer positions A = b-1..T-2
    answer_start: torch.Tensor  # (8,): b-1
    pool_at: torch.Tensor  # (8, 256) bool: what e is pooled over (item 2): the prompt 0..b-1
    pool_last: torch.Tensor  # (8,): the one position --echo-pool last reads: b-1
    inject_at: torch.Tensor  # (8, 256) bool: m_t, where the injection is on (item 4): A


def answer_only_masks(answer_targets: torch.Tensor, real: torch.Tensor, mask: str = "answer") -> AnswerOnlyMasks:
    """METHOD.md items 2 and 4: pooled over the prompt, injected at the answer. `answer_targets`,
    `real`: (8, 256), False at padding. mask "none" (the leaking ablation): every real position for both."""
    answer = answer_targets != IGNORE_INDEX  # (8, 256)
    answer_start = answer.float().argmax(1)  # (8,): the first answer position, b-1
    if mask == "answer":
        positions = torch.arange(answer.shape[1], device=answer.device)
        prompt = positions <= answer_start[:, None]  # (8, 256): positions 0..b-1
        return AnswerOnlyMasks(answer, answer_start, pool_at=prompt, pool_last=answer_start, inject_at=answer)
    return AnswerOnlyMasks(answer, answer_start, pool_at=real, pool_last=real.sum(1) - 1, inject_at=real)


# ---- 2. Echo representation


def echo_representation(source: list[torch.Tensor], masks: AnswerOnlyMasks, pool: str = "mean") -> torch.Tensor:
    """METHOD.md item 2: e = rms_norm( (1/b) sum_{t<b} (1/|S|) sum_{l in S} h_l[t] ), (8, 4096);
    pool "last" takes position b-1 instead of the mean."""
    h = sum(source) / len(source)  # (8, 256, 4096): the mean over l in S
    if pool == "mean":
        weight = masks.pool_at[..., None].float()  # (8, 256, 1)
        e = (h * weight).sum(1) / weight.sum(1)  # (8, 4096)
    else:
        e = h[torch.arange(h.shape[0], device=h.device), masks.pool_last]  # (8, 4096)
    return e * torch.rsqrt(e.pow(2).mean(-1, keepdim=True) + 1e-6)


# ---- 3. Targets


def echo_targets(model: nn.Module, target_layers: tuple[int, ...]) -> dict[str, LoRALinear]:
    """METHOD.md item 3: every adapted linear of the target blocks (1-based), by model path."""
    targets = {f"layers.{layer - 1}.{name}": m for layer in sorted(set(target_layers))  # in the model's order
               for name, m in model.layers[layer - 1].named_modules() if isinstance(m, LoRALinear)}
    if not targets:
        raise ValueError(f"no LoRA/DoRA modules in echo target blocks {target_layers}")
    return targets


# ---- 4. Injection, with projection and gate


class Injector(nn.Module):
    """METHOD.md item 4, one target's projection P (d -> r) and gate g(e) = sigmoid(w . e + c): the
    term m_t g(e) P e the target adds to A x."""

    def __init__(self, dim: int, r: int, out_features: int | None = None):
        super().__init__()
        self.proj = nn.Linear(dim, r, bias=False)  # P, (32, 4096)
        # --echo-up own: U (4096, 32), zeros like lora_B, but trained from the first step (a term
        # inside B u reaches the output only as fast as B grows from zero). Built without drawing
        # random numbers, so a seed draws the same P, dropout and routing as under --echo-up lora.
        self.up = None if out_features is None else nn.utils.skip_init(nn.Linear, r, out_features, bias=False)
        if self.up is not None:
            nn.init.zeros_(self.up.weight)
        nn.init.kaiming_uniform_(self.proj.weight, a=math.sqrt(5))  # initialised like lora_A
        self.gate_weight = nn.Parameter(torch.zeros(dim))  # w, (4096,)
        self.gate_bias = nn.Parameter(torch.tensor(-2.0))  # c: sigmoid(-2) = 0.12, a quiet start

    def gate(self, e: torch.Tensor) -> torch.Tensor:
        """g(e) = sigmoid(w . e + c), one per sample: (8, 4096) -> (8,)."""
        return torch.sigmoid(e @ self.gate_weight + self.gate_bias)

    def forward(self, u: torch.Tensor, e: torch.Tensor, sample_at: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """u: A x, (1, 192, 32) (only its dtype is used); e: (8, 4096); sample_at: (1, 192), the routed
        sample whose term each position takes, -1 where m_t = 0."""
        projected = gate[:, None] * self.proj(e)  # g(e) P e, (8, 32)
        term = projected[sample_at.clamp(min=0)] * (sample_at >= 0)[..., None]  # m_t g(e) P e, (1, 192, 32)
        return term.to(u.dtype)


class Diagnostics:
    """Running means of what shows whether the deep signal carries information, over the Echo
    passes since the last `read`: per routed answer token CE(echo), CE(plain) on the same tokens
    and the KL; per target and pass the mean gate g(e) and ||m_t g(e) P e|| / ||A x|| at m_t = 1."""

    def __init__(self):
        self.sums, self.counts = {}, {}

    def add(self, n: int = 1, **sums: torch.Tensor):
        for name, value in sums.items():
            self.sums[name] = self.sums.get(name, 0) + value.detach()
            self.counts[name] = self.counts.get(name, 0) + n

    def read(self) -> dict[str, float]:
        """The means since the last read (names prefixed echo_diag_), then start afresh."""
        means = {f"echo_diag_{k}": (v / self.counts[k]).item() for k, v in self.sums.items()}
        self.sums, self.counts = {}, {}
        return means


class EchoPath(nn.Module):
    """The Echo path, held beside the model: source and target layers (items 1, 3), an Injector per target."""

    def __init__(self, model, config: EchoConfig):
        super().__init__()
        n = model.args.n_layers
        self.config = config
        self.source_layers = tuple(config.source_layers or default_layers(n, "deep"))
        self.target_layers = tuple(config.target_layers or default_layers(n, "shallow"))
        for layer in self.source_layers + self.target_layers:
            if not 1 <= layer <= n:
                raise ValueError(f"echo layer {layer} is outside the model's blocks 1..{n}")
        self.targets = echo_targets(model, self.target_layers)
        self.injectors = nn.ModuleDict({
            path.replace(".", "_"): Injector(model.args.dim, m.r, m.base.out_features if config.up == "own" else None)
            for path, m in self.targets.items()})
        self.diagnostics = Diagnostics()

    @contextmanager
    def injecting(self, e: torch.Tensor, sample_at: torch.Tensor):
        """Within this block every target adds m_t g(e) P e (item 4), e the row of `e` that `sample_at`
        names at each position (-1: m_t = 0); under --echo-inject zero none does."""
        if self.config.inject == "echo":
            for path, module in self.targets.items():
                injector = self.injectors[path.replace(".", "_")]
                hook = partial(self.inject, injector, e=e, sample_at=sample_at)
                if injector.up is None:
                    module.injection = hook
                else:
                    module.up_injection = lambda u, hook=hook, up=injector.up: up(hook(u))
        try:
            yield
        finally:
            for module in self.targets.values():  # the discard (item 8): the plain model again
                module.injection = module.up_injection = None

    def inject(self, injector: "Injector", u: torch.Tensor, e: torch.Tensor, sample_at: torch.Tensor) -> torch.Tensor:
        """One target's injection, its gate and its size beside u = A x noted for the diagnostics."""
        gate = injector.gate(e)
        term = injector(u, e, sample_at, gate)
        with torch.no_grad():
            inject_at = sample_at >= 0
            self.diagnostics.add(gate=gate.float().mean(),
                                 injection_rel=term[inject_at].float().norm() / u[inject_at].float().norm().clamp_min(1e-12))
        return term

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ---- 5. Stochastic routing


def route(n_samples: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """METHOD.md item 5: which samples take the Echo pass, (16,) bool, each with probability p (a CPU
    `generator`: every device and rank draws the same)."""
    return torch.rand(n_samples, generator=generator) < p


# ---- 6. The Echo pass, and its suffix form


@dataclass
class PlainPass:
    """What the Echo pass needs of one plain pass (a part of a micro-batch): its routed `rows`, the
    source states and, for the suffix form, the keys and values."""

    batch: Batch
    rows: torch.Tensor
    states: dict
    caches: list | None


def echo_pass(echo_path: EchoPath, model, plain_passes: list[PlainPass]) -> torch.Tensor:
    """METHOD.md item 6: z_echo (N_echo, 32000) at the routed answer positions, in the order of
    `h[rows][answer[rows]]` part by part: every part's routed samples in one pass (a part's few
    alone make matmuls too small)."""
    config = echo_path.config
    masks = [answer_only_masks(p.batch.answer_targets[p.rows], p.batch.real[p.rows], config.mask)
             for p in plain_passes]
    e = torch.cat([echo_representation(source_states(p.states, echo_path.source_layers, p.rows), m, config.pool)
                   for p, m in zip(plain_passes, masks)])  # (8, 4096)
    if config.echo_pass == "full":
        return full_echo_pass(echo_path, model, plain_passes, e)
    return suffix_echo_pass(echo_path, model, plain_passes, masks, e)


def full_echo_pass(echo_path: EchoPath, model, plain_passes: list[PlainPass], e: torch.Tensor) -> torch.Tensor:
    """The reference: every position recomputed, the parts' routed samples right-padded to the
    longest part (causal: padding changes nothing). Never under activation checkpointing: its
    recomputation would run in backward, after the injection is off."""
    length = max(p.batch.tokens.shape[1] for p in plain_passes)

    def rows(p: PlainPass, tensor: torch.Tensor, fill) -> torch.Tensor:
        return F.pad(tensor[p.rows], (0, length - tensor.shape[1]), value=fill)  # (8, 256)

    tokens = torch.cat([rows(p, p.batch.tokens, 0) for p in plain_passes])  # (8, 256)
    masks = answer_only_masks(torch.cat([rows(p, p.batch.answer_targets, IGNORE_INDEX) for p in plain_passes]),
                              torch.cat([rows(p, p.batch.real, False) for p in plain_passes]), echo_path.config.mask)
    sample_at = torch.where(masks.inject_at, torch.arange(len(tokens), device=tokens.device)[:, None], -1)
    checkpointing, model.gradient_checkpointing = model.gradient_checkpointing, False
    try:
        with echo_path.injecting(e, sample_at):
            h, _ = model.hidden_states(tokens)  # (8, 256, 4096)
    finally:
        model.gradient_checkpointing = checkpointing
    return model.output(h[masks.answer]).float()


def suffix_echo_pass(echo_path: EchoPath, model, plain_passes: list[PlainPass], masks: list[AnswerOnlyMasks],
                     e: torch.Tensor) -> torch.Tensor:
    """METHOD.md item 6: only the answer positions b-1..T-2 are computed, every routed sample's packed
    into one row of 8 x 24 = 192, each at its own positions, attending to its own plain-pass keys and
    values of 0..b-2 (not detached) and causally to its own suffix. Equal to the full pass, as the
    injection is zero before b-1, except that the prefix keeps the plain pass's dropout draws."""
    device = e.device
    answers = [m.answer for m in masks]  # per part (2, 256) bool: b-1..T-2
    prefixes = [torch.arange(a.shape[1], device=device) < m.answer_start[:, None] for a, m in zip(answers, masks)]
    tokens = torch.cat([p.batch.tokens[p.rows][a] for p, a in zip(plain_passes, answers)])  # (192,)
    positions = torch.cat([a.nonzero()[:, 1] for a in answers])  # (192,): each token's own position
    samples = torch.arange(len(e), device=device)
    sample = samples.repeat_interleave(torch.cat([a.sum(1) for a in answers]))  # (192,): whose token
    prefix_sample = samples.repeat_interleave(torch.cat([b.sum(1) for b in prefixes]))  # (1856,): whose key

    def prefix(layer: int, name: str) -> torch.Tensor:  # (1, 32, 1856, 128): the samples' prefixes in a row
        keys = [getattr(p.caches[layer], name)[p.rows].transpose(1, 2)[b] for p, b in zip(plain_passes, prefixes)]
        return torch.cat(keys).transpose(0, 1)[None]

    caches = [KVCache(prefix(layer, "k"), prefix(layer, "v")) for layer in range(len(model.layers))]
    same = sample[:, None] == sample[None, :]  # (192, 192)
    mask = torch.cat([sample[:, None] == prefix_sample[None, :], same.tril()], dim=1)  # (192, 1856 + 192)
    with echo_path.injecting(e, sample[None]):
        h, _ = model.hidden_states(tokens[None], positions[None], mask[None, None], caches)  # (1, 192, 4096)
    return model.output(h[0]).float()


# ---- 7. Loss, with masked distillation


def loss_terms(model, parts: list[Batch], echo_path: EchoPath | None = None, routed: list[torch.Tensor] | None = None):
    """METHOD.md item 7, the loss of a micro-batch given as length-sorted parts (one plain pass each,
    one Echo pass for all), as sums over tokens, which train.accumulate_gradients divides by counts
    of the whole step (loss = ce_sum / N_ce + routed_sum / N_A):

        ce_sum     = sum CE(z_plain)                     over the parts' ce_targets
        routed_sum = sum CE(z_echo) + lambda tau^2 KL    over the routed samples' answer tokens

    `routed`: each part's rows of `route`'s draw. Logits only where a loss is taken."""
    ce_sum, plain_passes, routed_states, targets = 0, [], [], []
    for batch, routed_rows in zip(parts, routed or [None] * len(parts)):
        answer = batch.answer_targets != IGNORE_INDEX  # (4, 256): the answer positions A
        ce_at = batch.ce_targets != IGNORE_INDEX  # (4, 256): where the plain CE is taken
        # a sample cut off before its answer has no Echo terms
        rows = (routed_rows & answer.any(1)).nonzero()[:, 0] if echo_path is not None else []  # (2,): routed
        # The plain pass, the one deployed; for the Echo pass it also collects the source states
        # (item 1) and, for the suffix form, keeps its keys and values (item 6).
        caches = model.new_caches() if len(rows) and echo_path.config.echo_pass == "suffix" else None
        h, states = model.hidden_states(batch.tokens, caches=caches, collect=echo_path.source_layers if len(rows) else ())
        ce_sum = ce_sum + output_cross_entropy(h[ce_at], model.output.weight, batch.ce_targets[ce_at])
        if len(rows):
            plain_passes.append(PlainPass(batch, rows, states, caches))
            routed_answer = answer[rows]  # (2, 256): the routed samples' answer positions
            routed_states.append(h[rows][routed_answer])
            targets.append(batch.answer_targets[rows][routed_answer])
    if not plain_passes:
        return ce_sum, ce_sum.new_zeros(())
    z_echo = echo_pass(echo_path, model, plain_passes)  # (N_echo, 32000)
    z_plain = model.output(torch.cat(routed_states)).float()  # (N_echo, 32000), in the order of z_echo
    tau, distill = echo_path.config.tau, echo_path.config.distill
    targets = torch.cat(targets)
    ce_echo, kl = F.cross_entropy(z_echo, targets, reduction="sum"), masked_distillation(z_plain, z_echo, tau)
    echo_path.diagnostics.add(n=len(targets), ce_echo=ce_echo, kl=kl,
                              ce_plain=F.cross_entropy(z_plain.detach(), targets, reduction="sum"))
    return ce_sum, ce_echo + distill * tau ** 2 * kl


def masked_distillation(z_plain: torch.Tensor, z_echo: torch.Tensor, tau: float) -> torch.Tensor:
    """METHOD.md item 7: KL( softmax(z_echo / tau).detach() || softmax(z_plain / tau) ), summed over
    the routed answer positions: the detached teacher pulls the deployed plain path alone."""
    return F.kl_div(F.log_softmax(z_plain / tau, -1), F.log_softmax(z_echo.detach() / tau, -1),
                    log_target=True, reduction="sum")


# ---- 8. Discard: nothing to run, the model never holds the Echo path (EchoPath.injecting).


# --------------------------------------------------------------------------------------------
# The adapter as saved: its tensors and settings, written and read through data/adapters.py


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """lora_A, lora_B (and DoRA's magnitude) of every adapted linear, keyed by model path."""
    return {f"{path}.{name}": getattr(module, name) for path, module in adapted_linears(model).items()
            for name in (("lora_A", "lora_B", "magnitude") if module.dora else ("lora_A", "lora_B"))}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that make up the adapter, e.g. 'layers.0.attention.wq.lora_A' -> (r, dim)."""
    return {name: p.detach() for name, p in adapter_parameters(model).items()}


def block_and_target(path: str) -> tuple[int, str]:
    """'layers.3.attention.wq' -> (3, 'wq')."""
    m = re.fullmatch(r"layers\.(\d+)\.(\w+\.\w+)", path)
    if not m or m.group(2) not in BLOCK_LINEARS.values():
        raise ValueError(f"{path!r} is not a block linear of a LLaMA model")
    return int(m.group(1)), m.group(2).split(".")[1]


def adapter_config(model: nn.Module) -> dict:
    """The add_adapters arguments that rebuild this model's adapters (layers None = all)."""
    modules = adapted_linears(model)
    if not modules:
        raise ValueError("the model has no adapters")
    settings = {(m.r, m.alpha, m.dropout.p, m.dora) for m in modules.values()}
    if len(settings) > 1:
        raise ValueError(f"the model's adapters differ in (r, alpha, dropout, dora): {sorted(settings)}")
    [(r, alpha, dropout, dora)] = settings
    sites = {block_and_target(path) for path in modules}
    blocks = sorted({i for i, _ in sites})
    targets = [t for t in BLOCK_LINEARS if t in {target for _, target in sites}]  # in block order
    if sites != {(i, t) for i in blocks for t in targets}:
        raise ValueError("the model's adapters are not the same targets in every adapted block")
    layers = None if blocks == list(range(len(model.layers))) else blocks
    return dict(r=r, alpha=alpha, dropout=dropout, dora=dora, targets=targets, layers=layers)


def base_model_record(model: nn.Module) -> dict:
    """The base model's shape and weights' fingerprint (None for a model not read by llama.load)."""
    a = model.args
    shape = dict(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.kv_heads, vocab_size=a.vocab_size,
                 hidden_dim=a.hidden_dim)
    return dict(shape=shape, fingerprint=getattr(model, "fingerprint", None))


def save_adapter(path, model: nn.Module, config: dict | None = None):
    """Write `path/adapter.safetensors` and `path/adapter_config.json` (plus the entries of `config`)."""
    settings = {**adapter_config(model), "base_model": base_model_record(model)}
    write_adapter(Path(path), adapter_state(model), settings, config or {})


def load_adapter(path, model: nn.Module) -> dict:
    """Load save_adapter's files into `model` (adding the adapters if it has none); the saved config.
    The fit is checked before the files' own checks, so a file that does not fit says how."""
    folder = Path(path)
    config = read_adapter_config(folder)
    fit_adapters(model, config, folder / CONFIG_FILE)
    tensors, data = read_adapter_tensors(folder)
    copy_adapter_tensors(adapter_parameters(model), tensors, folder / ADAPTER_FILE)
    check_adapter_files(folder, config, data)
    check_base_model(config.get("base_model"), base_model_record(model), folder / CONFIG_FILE)
    return config


def fit_adapters(model: nn.Module, config: dict, file: Path):
    """Give `model` the adapters `config` describes, or check that the ones it has match."""
    if config["r"] > model.args.dim:  # a rank past the model's width adds nothing, and its tensors may not fit in memory
        raise ValueError(f"{file}: rank r {config['r']} is above the model's width {model.args.dim}")
    if adapted_linears(model):
        return check_fit(adapter_config(model), config, len(model.layers), file)
    try:
        add_adapters(model, config["targets"], config["r"], config["alpha"], config["dropout"], config["dora"],
                     config["layers"])
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None


# --------------------------------------------------------------------------------------------
# Speed kernels: what nn.Dropout and F.linear + F.cross_entropy compute, faster on a CPU


class Dropout(nn.Dropout):
    """nn.Dropout, its CPU mask drawn as uniform floats >= p (32 random bits per element where torch's
    Bernoulli draws 64): a third cheaper, and dropout was a sixth of a CPU step. CUDA: nn.Dropout's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        keep = torch.rand(x.shape, device=x.device) >= self.p
        return torch.where(keep, x * (1 / (1 - self.p)), 0)


class OutputCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i W^T, y_i) in chunks of rows, the gradient d/dh_i = (softmax(h_i W^T) - onehot(y_i)) W
    made in the forward pass: the (16 x 256, 32000) fp32 logits (0.5 GB for LLaMA-7B) and their
    gradient never exist at once, which halves the head's CPU cost. W is frozen in every method."""

    CHUNK = 256  # rows per chunk: (256, 49152) fp32 is 50 MB

    @staticmethod
    def forward(ctx, h, weight, targets):
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        for start in range(0, h.shape[0], OutputCrossEntropy.CHUNK):
            rows = slice(start, start + OutputCrossEntropy.CHUNK)
            log_probs = F.log_softmax(F.linear(h[rows], weight).float(), -1)  # (chunk, vocab)
            total += F.nll_loss(log_probs, targets[rows], reduction="sum")
            if grad_h is not None:
                d_logits = log_probs.exp_()  # softmax - onehot(y): the CE's gradient by its logits
                d_logits[torch.arange(d_logits.shape[0], device=h.device), targets[rows]] -= 1
                grad_h[rows] = d_logits.to(h.dtype) @ weight
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_total.to(grad_h.dtype), None, None


def output_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`F.cross_entropy(F.linear(h, weight).float(), targets, reduction="sum")` without the logits held
    for backward; h: (N, 4096), under autocast in its dtype, as `model.output` would."""
    if weight.requires_grad:
        raise ValueError("output_cross_entropy: the output layer is frozen in every method here")
    if torch.is_autocast_enabled(h.device.type):
        dtype = torch.get_autocast_dtype(h.device.type)
        h, weight = h.to(dtype), weight.to(dtype)
    with torch.autocast(h.device.type, enabled=False):
        return OutputCrossEntropy.apply(h, weight, targets)
