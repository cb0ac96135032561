"""The Echo path's properties (METHOD.md), each checked against a computation written out here:
masking (nothing leaks from the answer), the teacher/student split of the distillation, the
discard (a stripped adapter is a plain LoRA adapter), the parameter count, and the suffix echo
pass against the full recomputation it replaces."""

import math

import pytest
import torch
import torch.nn.functional as F

import llama
from data.commonsense import IGNORE_INDEX
from echo_lora import (EchoConfig, EchoPath, LoRALinear, add_adapters, answer_only_masks, echo_representation, load_adapter,
                       loss_terms, save_adapter, source_states, trainable_parameters)
from train import collate

ARGS = llama.ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=101, multiple_of=32)


def adapted_model(dora=False, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    model = llama.Transformer(ARGS)
    add_adapters(model, r=8, alpha=16, dropout=dropout, dora=dora)
    with torch.no_grad():  # non-zero B (and magnitude), so every adapter term is really there
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.1)
                if dora:
                    m.magnitude.mul_(torch.empty_like(m.magnitude).uniform_(0.8, 1.2))
    return model.train()


def echo_path(model, **kw):
    echo = EchoPath(model, EchoConfig(**kw))
    with torch.no_grad():  # an open gate and a gate weight that depends on e
        for inj in echo.injectors.values():
            inj.gate_weight.normal_(0, 0.3)
            inj.gate_bias.fill_(0.5)
    return echo


def examples_of(prompt_lengths, answer_lengths, seed):
    """(ids, answer-only labels) of random records: BOS, a prompt, then the answer."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for p, a in zip(prompt_lengths, answer_lengths):
        ids = [1] + torch.randint(3, 101, (p + a - 1,), generator=g).tolist()
        examples.append((ids, [IGNORE_INDEX] * p + ids[p:]))
    return examples


def ragged_batch(seed=1, prompt_lengths=(9, 4, 13, 6), answer_lengths=(4, 6, 3, 0)):
    """Right-padded examples with ragged prompts; the last one lost its answer to the cutoff."""
    return collate(examples_of(prompt_lengths, answer_lengths, seed), train_on_inputs=False, pad_id=0)


def test_plain_loss_is_cross_entropy_on_answer_tokens():
    model, batch = adapted_model(), ragged_batch()
    ce_sum, echo_sum = loss_terms(model, [batch])
    logits = model(batch.tokens)
    labels = torch.full_like(batch.tokens, IGNORE_INDEX)
    for i, (p, a) in enumerate(zip((9, 4, 13, 6), (4, 6, 3, 0))):
        labels[i, p:p + a] = batch.tokens[i, p:p + a]
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 101), labels[:, 1:].reshape(-1), reduction="sum")
    assert torch.allclose(ce_sum, expected, atol=1e-5) and echo_sum == 0


def test_echo_pass_leaves_prompt_positions_bit_identical():
    model, batch = adapted_model(), ragged_batch()
    echo = echo_path(model, echo_pass="full")
    answer = batch.answer_targets != IGNORE_INDEX
    e = torch.randn(4, ARGS.dim)
    with torch.no_grad():
        plain = model(batch.tokens)
        with echo.injecting(e, torch.where(answer, torch.arange(4)[:, None], -1)):  # row i: e[i]
            echoed = model(batch.tokens)
    answer_start = answer.float().argmax(1)  # b-1
    for i in range(3):  # samples with an answer
        b_minus_1 = int(answer_start[i])
        assert torch.equal(plain[i, :b_minus_1], echoed[i, :b_minus_1])
        assert (plain[i, b_minus_1:] - echoed[i, b_minus_1:]).abs().max() > 1e-3  # the injection is real


def answer_swapped(batch, row):
    """The same batch with sample `row`'s answer tokens replaced."""
    tokens = batch.tokens.clone()
    answer_tokens = torch.zeros_like(batch.real)
    answer_tokens[:, 1:] = batch.answer_targets[:, :-1] != IGNORE_INDEX
    tokens[row][answer_tokens[row]] = (tokens[row][answer_tokens[row]] + 7) % 101
    return tokens


@pytest.mark.parametrize("pool", ["mean", "last"])
def test_echo_representation_does_not_see_the_answer(pool):
    model, batch = adapted_model(), ragged_batch()
    echo = echo_path(model, pool=pool)
    rows = torch.arange(4)
    masks = answer_only_masks(batch.answer_targets, batch.real)
    vectors = []
    for tokens in (batch.tokens, answer_swapped(batch, 0)):
        _, states = model.hidden_states(tokens, collect=echo.source_layers)
        vectors.append(echo_representation(source_states(states, echo.source_layers, rows), masks, pool))
    assert torch.equal(vectors[0], vectors[1])


def test_echo_mask_none_leaks_the_answer():
    """The ablation the masks exist to prevent: pooled over all positions, e sees the answer."""
    model, batch = adapted_model(), ragged_batch()
    echo = echo_path(model, mask="none", echo_pass="full")
    rows = torch.arange(4)
    masks = answer_only_masks(batch.answer_targets, batch.real, mask="none")
    vectors = []
    for tokens in (batch.tokens, answer_swapped(batch, 0)):
        _, states = model.hidden_states(tokens, collect=echo.source_layers)
        vectors.append(echo_representation(source_states(states, echo.source_layers, rows), masks))
    assert (vectors[0][0] - vectors[1][0]).abs().max() > 1e-4


def test_distillation_gradient_reaches_the_plain_path_not_the_teacher():
    """KL(teacher || plain) with the teacher detached: its gradient is zero on the projection
    and gate (which only the teacher uses) and non-zero on the adapters (the plain path)."""
    grads = {}
    for distill in (0.0, 1.0):
        model, batch = adapted_model(), ragged_batch()
        echo = echo_path(model, distill=distill, echo_pass="full")
        _, echo_sum = loss_terms(model, [batch], echo, [torch.ones(4, dtype=torch.bool)])
        params = trainable_parameters(model) + list(echo.parameters())
        grads[distill] = torch.autograd.grad(echo_sum, params, allow_unused=True)
    n_adapter = len(trainable_parameters(model))
    kl_grads = [None if a is None else b - a for a, b in zip(grads[0.0], grads[1.0])]
    assert all(g is None or g.abs().max() < 1e-6 for g in kl_grads[n_adapter:])  # teacher: nothing
    assert max(g.abs().max().item() for g in kl_grads[:n_adapter] if g is not None) > 1e-4  # plain path


def test_echo_parameter_count_matches_the_formula():
    args = llama.ModelArgs(dim=64, n_layers=8, n_heads=4, vocab_size=101, multiple_of=32)
    model = llama.Transformer(args)
    add_adapters(model, r=8)
    echo = EchoPath(model, EchoConfig())
    K, targets, d, r = 2, 5, 64, 8  # shallowest quarter of 8 blocks; q, k, v, up, down
    assert echo.target_layers == (1, 2) and echo.source_layers == (7, 8)
    assert echo.n_parameters() == K * targets * (d * r + d + 1)
    # LLaMA-7B, K = 8, r = 32: METHOD.md's "5.4 M"
    assert abs(8 * 5 * (4096 * 32 + 4096 + 1) - 5.4e6) < 0.1e6


@pytest.mark.parametrize("dora", [False, True])
def test_stripped_echo_adapter_is_a_plain_lora_adapter(tmp_path, dora):
    model, batch = adapted_model(dora=dora), ragged_batch()
    echo = echo_path(model)
    opt = torch.optim.AdamW(trainable_parameters(model) + list(echo.parameters()), lr=1e-2)
    for _ in range(2):
        ce, es = loss_terms(model, [batch], echo, [torch.ones(4, dtype=torch.bool)])
        (ce + es).backward()
        opt.step()
        opt.zero_grad()
    save_adapter(tmp_path / "echo", model, {})
    # a plain LoRA model with the same A, B (and magnitude)
    plain = adapted_model(dora=dora)  # same base weights (seed 0); its adapters are overwritten below
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if p.requires_grad:
                p.copy_(dict(model.named_parameters())[name])
    save_adapter(tmp_path / "plain", plain, {})
    echo_file = (tmp_path / "echo" / "adapter.safetensors").read_bytes()
    assert echo_file == (tmp_path / "plain" / "adapter.safetensors").read_bytes()
    assert (tmp_path / "echo" / "adapter_config.json").read_text() == (tmp_path / "plain" / "adapter_config.json").read_text()
    assert set(model.state_dict()) == set(plain.state_dict())  # no echo tensors in the model
    torch.manual_seed(0)
    fresh = llama.Transformer(ARGS)  # the same base weights, no adapters yet
    load_adapter(tmp_path / "echo", fresh)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(batch.tokens), plain.eval()(batch.tokens))


def loss_and_grads(dora, echo_pass, routed, batch=None, checkpointing=False):
    model, batch = adapted_model(dora=dora), batch or ragged_batch()
    model.gradient_checkpointing = checkpointing
    echo = echo_path(model, echo_pass=echo_pass)
    ce_sum, echo_sum = loss_terms(model, [batch], echo, [routed])
    loss = ce_sum + echo_sum
    loss.backward()
    grads = {n: p.grad for n, p in list(model.named_parameters()) + list(echo.named_parameters()) if p.requires_grad}
    return loss, grads


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("routed", [[1, 1, 1, 1], [1, 0, 1, 0], [0, 1, 0, 1], [0, 0, 0, 0]])
def test_suffix_echo_pass_equals_full_recomputation(dora, routed):
    routed = torch.tensor(routed, dtype=torch.bool)
    full_loss, full_grads = loss_and_grads(dora, "full", routed)
    suffix_loss, suffix_grads = loss_and_grads(dora, "suffix", routed)
    assert abs(full_loss.item() - suffix_loss.item()) < 1e-5
    assert full_grads.keys() == suffix_grads.keys()
    for name in full_grads:
        f, s = full_grads[name], suffix_grads[name]
        if f is None or s is None:
            assert f is None and s is None, name  # e.g. echo modules when nothing is routed
            continue
        assert (f - s).abs().max() < 1e-5, name


@pytest.mark.parametrize("echo_pass", ["suffix", "full"])
@pytest.mark.parametrize("dora", [False, True])
def test_parts_of_a_micro_batch_share_one_echo_pass_of_the_same_function(echo_pass, dora):
    """A micro-batch given as two length-sorted parts (two plain passes, one Echo pass over both
    parts' routed samples) computes the loss and gradients of the
    same samples given as one batch."""
    examples = examples_of((9, 4, 13, 6, 22, 3), (4, 6, 3, 0, 5, 2), seed=3)
    routed = torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.bool)
    results = []
    for parts in ([[0, 1, 2, 3, 4, 5]], [[1, 5, 3], [0, 2, 4]]):
        model = adapted_model(dora=dora)
        echo = echo_path(model, echo_pass=echo_pass)
        batches = [collate([examples[i] for i in part], train_on_inputs=True, pad_id=0) for part in parts]
        ce_sum, echo_sum = loss_terms(model, batches, echo, [routed[part] for part in parts])
        (ce_sum + echo_sum).backward()
        grads = {n: p.grad for n, p in list(model.named_parameters()) + list(echo.named_parameters()) if p.requires_grad}
        results.append((ce_sum.item(), echo_sum.item(), grads))
    (ce, es, grads), (parts_ce, parts_es, parts_grads) = results
    assert abs(ce - parts_ce) < 1e-4 and abs(es - parts_es) < 1e-4 and es > 0
    for name in grads:
        assert (grads[name] - parts_grads[name]).abs().max() < 1e-5, name


@pytest.mark.parametrize("echo_pass", ["suffix", "full"])
def test_gradient_checkpointing_changes_nothing_but_memory(echo_pass):
    routed = torch.tensor([1, 0, 1, 1], dtype=torch.bool)
    loss, grads = loss_and_grads(False, echo_pass, routed)
    ckpt_loss, ckpt_grads = loss_and_grads(False, echo_pass, routed, checkpointing=True)
    assert abs(loss.item() - ckpt_loss.item()) < 1e-5
    for name in grads:
        assert (grads[name] - ckpt_grads[name]).abs().max() < 1e-5, name


def saved_activation_bytes(echo_pass):
    """Bytes the autograd graph keeps for backward (the activations), counted once per storage."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model, batch = adapted_model(), ragged_batch(prompt_lengths=(40, 33, 51, 27), answer_lengths=(4, 6, 3, 5))
    echo = echo_path(model, echo_pass=echo_pass)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_terms(model, [batch], echo, [torch.ones(4, dtype=torch.bool)])
    return sum(seen.values())


def test_suffix_pass_keeps_no_more_activations_than_full():
    full, suffix = saved_activation_bytes("full"), saved_activation_bytes("suffix")
    assert suffix < 0.75 * full, (suffix, full)


@pytest.mark.parametrize("dora", [False, True])
def test_the_control_runs_every_echo_term_without_the_deep_signal(dora):
    """--echo-inject zero (METHOD.md item 4's control): with dropout off, the Echo pass computes the
    plain pass's function, so on the routed answer tokens CE(echo) is CE(plain) and the KL is 0 (up
    to float rounding), while the Echo loss terms still run; with the injection on they differ."""
    batch, routed = ragged_batch(), torch.tensor([True, True, True, False])
    for inject in ("zero", "echo"):
        model = adapted_model(dora=dora)
        echo = echo_path(model, inject=inject)
        ce_sum, echo_sum = loss_terms(model, [batch], echo, [routed])
        d = echo.diagnostics.read()
        assert echo_sum > 0 and math.isfinite(d["echo_diag_ce_echo"])
        if inject == "zero":
            assert abs(d["echo_diag_ce_echo"] - d["echo_diag_ce_plain"]) < 1e-5 and abs(d["echo_diag_kl"]) < 1e-6
            assert "echo_diag_gate" not in d  # no injection was computed
        else:
            assert abs(d["echo_diag_ce_echo"] - d["echo_diag_ce_plain"]) > 1e-3 and d["echo_diag_kl"] > 1e-6
            assert 0 < d["echo_diag_gate"] < 1 and d["echo_diag_injection_rel"] > 0


def test_echo_up_own_adds_its_own_up_projection_to_the_output():
    """--echo-up own (METHOD.md item 4): y = W x + s (B A x + m_t U g(e) P e), written out here for one
    target; U starts at zero, so the Echo pass starts as the plain pass, and unlike a term inside
    B u (B zero at the start), U takes a gradient from CE(echo) at the first step."""
    torch.manual_seed(0)
    model = llama.Transformer(ARGS)
    add_adapters(model, r=8, alpha=16, dropout=0.0)
    model.train()
    echo = echo_path(model, up="own")
    path, target = next(iter(echo.targets.items()))
    injector = echo.injectors[path.replace(".", "_")]
    with torch.no_grad():
        injector.up.weight.normal_(0, 0.1)
        target.lora_B.normal_(0, 0.1)
    x, e = torch.randn(2, 5, ARGS.dim), torch.randn(2, ARGS.dim)
    inject_at = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]], dtype=torch.bool)
    with echo.injecting(e, torch.where(inject_at, torch.arange(2)[:, None], -1)):
        y = target(x)
    gate = torch.sigmoid(e @ injector.gate_weight + injector.gate_bias)
    term = inject_at[..., None] * (gate[:, None] * (e @ injector.proj.weight.T))[:, None, :]
    expected = x @ target.base.weight.T + target.scale * (x @ target.lora_A.T @ target.lora_B.T
                                                          + term @ injector.up.weight.T)
    assert (y - expected).abs().max() < 1e-5
    assert target.injection is None and target.up_injection is None  # discarded after the pass

    for up in ("lora", "own"):  # fresh adapters: B = 0 and U = 0
        model = adapted_model(seed=1)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, LoRALinear):
                    m.lora_B.zero_()
        echo = EchoPath(model, EchoConfig(up=up))
        ce_sum, echo_sum = loss_terms(model, [ragged_batch()], echo, [torch.ones(4, dtype=torch.bool)])
        d = echo.diagnostics.read()
        assert abs(d["echo_diag_ce_echo"] - d["echo_diag_ce_plain"]) < 1e-6  # the plain function at the start
        echo_sum.backward()
        reaches = [inj.up.weight.grad.abs().max() > 0 if up == "own" else inj.proj.weight.grad.abs().max() > 0
                   for inj in echo.injectors.values()]
        assert all(reaches) if up == "own" else not any(reaches)


def test_echo_up_own_draws_the_same_random_numbers_as_lora():
    """U is built without drawing random numbers: under the same seed --echo-up own starts with the
    same projections P and leaves the generator where --echo-up lora leaves it (the same dropout
    and routing afterwards), so the two channels differ in nothing else."""
    paths, after = {}, {}
    for up in ("lora", "own"):
        model = adapted_model(seed=1)
        torch.manual_seed(5)
        echo = EchoPath(model, EchoConfig(up=up))
        paths[up] = {k: v for k, v in echo.state_dict().items() if not k.endswith("up.weight")}
        after[up] = torch.rand(8)
    assert paths["lora"].keys() == paths["own"].keys()
    assert all(torch.equal(paths["lora"][k], paths["own"][k]) for k in paths["lora"])
    assert torch.equal(after["lora"], after["own"])
