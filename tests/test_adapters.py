"""LoRA and DoRA adapters (echo_lora.py), proven against HF peft on tiny random LLaMAs.

The reference is transformers' LlamaForCausalLM with our weights (tests/reference.py) wrapped by
peft, with the same non-zero adapter weights. HF permutes the rows of q and k, so the rows of
lora_B and of the DoRA magnitude of wq/wk are permuted the same way for every comparison.
Every numeric check states its measured difference in its assertion message.
"""

import json

import peft
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from echo_lora import (LoRALinear, adapted_linears, add_adapters, adapter_config, adapter_state, load_adapter, merge,
                       save_adapter, trainable_parameters)
from llama import ModelArgs, Transformer
from reference import META_TO_HF_LAYER_NAMES, hf_llama
from scripts.convert_hf import hf_to_meta_rows, meta_to_hf_rows
from scripts.convert_peft import export_peft, import_peft

# peft calls a transformers method that transformers 5 has deprecated; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

ARGS = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=101, multiple_of=32, max_seq_len=64)
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]  # the default targets, HF names
R, ALPHA = 4, 8


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ARGS)
    with torch.no_grad():  # non-trivial norms, so a permutation mistake in them would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, ARGS.vocab_size, (2, 11), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def randomize_adapters(model, seed: int = 2):
    """Non-zero lora_B and a magnitude away from ||W||, so every term of the formulas matters."""
    g = torch.Generator().manual_seed(seed)
    for module in adapted_linears(model).values():
        module.lora_A.copy_(torch.randn(module.lora_A.shape, generator=g) * 0.2)
        module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=g) * 0.2)
        if module.dora:
            module.magnitude.mul_(1 + 0.3 * torch.rand(module.magnitude.shape, generator=g))


def peft_module(peft_model, path: str):
    """The peft LoRA layer for our 'layers.0.attention.wq'."""
    _, i, rest = path.split(".", 2)
    return peft_model.get_submodule(f"base_model.model.model.layers.{i}.{META_TO_HF_LAYER_NAMES[rest]}")


def peft_gradients(model, peft_model) -> dict[str, torch.Tensor]:
    """The gradients of peft's adapter tensors under our names, q/k rows back in Meta order."""
    out = {}
    for path, module in adapted_linears(model).items():
        layer = peft_module(peft_model, path)
        found = {"lora_A": layer.lora_A["default"].weight, "lora_B": layer.lora_B["default"].weight}
        if module.dora:
            found["magnitude"] = layer.lora_magnitude_vector["default"].weight
        for kind, p in found.items():
            t = p.grad
            if kind != "lora_A" and path.endswith(("wq", "wk")):
                t = hf_to_meta_rows(t, ARGS.n_heads if path.endswith("wq") else ARGS.kv_heads)
            out[f"{path}.{kind}"] = t
    return out


@torch.no_grad()
def copy_adapters_into_peft(model, peft_model):
    for path, module in adapted_linears(model).items():
        layer = peft_module(peft_model, path)
        heads = {"wq": ARGS.n_heads, "wk": ARGS.kv_heads}.get(path.rsplit(".", 1)[1])
        rows = (lambda t: meta_to_hf_rows(t, heads)) if heads else (lambda t: t)
        layer.lora_A["default"].weight.copy_(module.lora_A)
        layer.lora_B["default"].weight.copy_(rows(module.lora_B))
        if module.dora:
            layer.lora_magnitude_vector["default"].weight.copy_(rows(module.magnitude))


def max_diff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


# --------------------------------------------------------------------------------------------
# LoRALinear on a bare nn.Linear


def bare_layer(dora: bool, dtype=torch.float32, seed: int = 0, out_features: int = 48) -> LoRALinear:
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(32, out_features, bias=False).to(dtype), r=R, alpha=ALPHA, dropout=0.0, dora=dora)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.2)
        if dora:
            layer.magnitude.mul_(1.5)
    return layer


@pytest.mark.parametrize("dora", [False, True])
def test_new_adapter_computes_the_base_layer(dora):
    torch.manual_seed(0)
    base = nn.Linear(32, 48, bias=False)
    layer = LoRALinear(base, r=R, alpha=ALPHA, dropout=0.0, dora=dora)
    x = torch.randn(5, 32)
    diff = max_diff(layer(x), base(x))
    assert diff < 1e-6, f"B = 0 must give the base output, max diff {diff:.2e}"
    assert layer.lora_A.abs().max() <= 1 / 32**0.5  # kaiming-uniform(a=sqrt 5): bound 1/sqrt(fan_in)
    assert not base.weight.requires_grad


@pytest.mark.parametrize("dora", [False, True])
def test_adapter_is_fp32_on_a_bf16_base_and_returns_bf16(dora):
    layer = bare_layer(dora, torch.bfloat16)
    assert {p.dtype for p in trainable_parameters(layer)} == {torch.float32}
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_B.grad.dtype == torch.float32 and layer.base.weight.grad is None
    expected = bare_layer(dora, torch.float32)
    with torch.no_grad():
        expected.base.weight.copy_(layer.base.weight.float())
        expected.refresh_base_norm()
        expected.lora_A.copy_(layer.lora_A)
    diff = max_diff(y, expected(x.float()))
    assert diff < 2e-2, f"bf16 base vs fp32 base: max diff {diff:.2e} (bf16 output rounding)"


@pytest.mark.parametrize("dora", [False, True])
def test_autocast_keeps_the_norm_fp32_and_returns_the_autocast_dtype(dora):
    layer = bare_layer(dora)
    x = torch.randn(5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        norm = layer.weight_norm() if dora else None
    assert y.dtype == torch.bfloat16
    if dora:
        assert norm.dtype == torch.float32 and torch.equal(norm, layer.weight_norm())
    diff = max_diff(y, layer(x))
    assert diff < 5e-2, f"autocast bf16 vs fp32: max diff {diff:.2e}"


@pytest.mark.parametrize("dora", [False, True])
def test_dropout_reaches_only_the_adapter_input(dora):
    layer = bare_layer(dora)
    layer.dropout.p = 0.5
    layer.adapter_only_dropout = True  # DoRA's departure flag; the recipe's form: tests/test_recipe.py
    layer.train()
    x = torch.randn(5, 32)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    dropped = layer.dropout(x)  # the same draw
    expected = layer.base(x) + layer.scale * dropped @ layer.lora_A.T @ layer.lora_B.T  # W x, not W dropout(x)
    if dora:
        expected = layer.magnitude / layer.weight_norm() * expected
    diff = max_diff(y, expected)
    assert diff < 1e-6, f"max diff {diff:.2e}"


def test_cpu_dropout_is_inverted_bernoulli_dropout():
    """echo_lora.Dropout's CPU mask against the definition (nn.Dropout's function): each element
    zeroed with probability p, every kept one exactly x / (1 - p); over 2^20 elements the zeroed
    fraction is within 5 standard deviations of p (binomial: sqrt(p (1 - p) / n) = 2.1e-4)."""
    from echo_lora import Dropout

    x = torch.rand(1024, 1024) + 1.0  # no zeros of its own
    dropped = Dropout(0.05).train()(x)
    zeroed = dropped == 0
    assert abs(zeroed.float().mean().item() - 0.05) < 5 * (0.05 * 0.95 / x.numel()) ** 0.5
    assert torch.equal(dropped[~zeroed], x[~zeroed] * (1 / 0.95))
    assert torch.equal(Dropout(0.05).eval()(x), x)


def materialised_norm(layer: LoRALinear) -> torch.Tensor:
    """The reference: ||W + s B A|| per row from the full matrix, in fp64."""
    full = layer.base.weight.double() + layer.scale * layer.lora_B.double() @ layer.lora_A.double()
    return torch.linalg.vector_norm(full, dim=1)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5)])
def test_weight_norm_without_materialising_equals_the_materialised_norm(dtype, tolerance):
    # bf16: the reference uses the same bf16 W (exact in fp64); the factored norm computes in fp32
    # from W upcast, so its error is fp32 rounding (measured ~1e-7), not bf16's 4e-3.
    layer = bare_layer(True, dtype, out_features=256)
    with torch.no_grad():
        layer.lora_B.normal_(0, 1.0)  # rows of s B A ~3.5x those of W: far beyond fine-tuning
    reference = materialised_norm(layer)
    rel = ((layer.weight_norm().double() - reference).abs() / reference).max().item()
    assert rel < tolerance, f"{dtype}: max relative diff {rel:.2e}"


def test_zero_norm_rows_give_no_nan():
    layer = bare_layer(True, out_features=8)
    with torch.no_grad():
        layer.base.weight[:3] = 0  # rows of W that are zero...
        layer.lora_B[:3] = 0  # ...and stay zero in W + s B A
        layer.refresh_base_norm()
        layer.magnitude[:2] = 0  # as initialised from such a row
    x = torch.randn(5, 32)
    y = layer(x)
    y.sum().backward()
    grads = [p.grad for p in trainable_parameters(layer)]
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
    assert (y[:, :3] == 0).all()
    with torch.no_grad():
        merged = layer.merged_weight()
    assert torch.isfinite(merged).all() and (merged[:3] == 0).all()


def test_base_norm_follows_a_loaded_base_weight():
    layer = bare_layer(True)
    new_weight = torch.randn(48, 32)
    layer.load_state_dict({**layer.state_dict(), "base.weight": new_weight})
    diff = max_diff(layer.base_norm_sq, new_weight.pow(2).sum(1))
    assert diff < 1e-5, f"max diff {diff:.2e}"


# --------------------------------------------------------------------------------------------
# The Echo path's injection hook


@pytest.mark.parametrize("dora", [False, True])
def test_injection_hook_returning_zeros_changes_nothing(dora):
    layer = bare_layer(dora)
    x = torch.randn(5, 32)
    plain = layer(x)
    layer.injection = torch.zeros_like
    assert torch.equal(layer(x), plain)


def test_injection_hook_constant_adds_scale_B_c_to_lora():
    layer = bare_layer(False)
    x = torch.randn(5, 32)
    plain = layer(x)
    c = torch.randn(R)
    layer.injection = lambda u: c
    diff = max_diff(layer(x) - plain, layer.scale * layer.lora_B @ c)
    assert diff < 1e-6, f"max diff {diff:.2e}"


def test_injection_hook_enters_dora_direction_but_not_the_norm():
    layer = bare_layer(True)
    x = torch.randn(5, 32)
    c = torch.randn(R)
    norm = layer.weight_norm()
    layer.injection = lambda u: c
    assert torch.equal(layer.weight_norm(), norm)
    expected = layer.magnitude / norm * (layer.base(x) + layer.scale * (x @ layer.lora_A.T + c) @ layer.lora_B.T)
    diff = max_diff(layer(x), expected)
    assert diff < 1e-6, f"max diff {diff:.2e}"


class ConstantInjection(nn.Module):
    """A stand-in for the Echo path's modules: it has trainable parameters of its own."""

    def __init__(self):
        super().__init__()
        self.projection = nn.Parameter(torch.randn(R))

    def forward(self, u):
        return self.projection.expand_as(u)


@pytest.mark.parametrize("dora", [False, True])
def test_injection_modules_stay_out_of_state_save_and_merge(dora, tmp_path):
    model = add_adapters(tiny_model(), r=R, alpha=ALPHA, dropout=0.0, dora=dora)
    randomize_adapters(model)
    x = tokens()
    with torch.no_grad():
        plain = model(x)
    keys = set(adapter_state(model))
    for module in adapted_linears(model).values():
        module.injection = ConstantInjection()
    assert set(adapter_state(model)) == keys
    assert any(p is m.injection.projection for m in adapted_linears(model).values() for p in trainable_parameters(model))
    with torch.no_grad():
        assert max_diff(model(x), plain) > 1e-3  # the injection is live
    save_adapter(tmp_path, model)
    assert set(load_file(str(tmp_path / "adapter.safetensors"))) == keys
    merge(model)
    with torch.no_grad():
        diff = max_diff(model(x), plain)
    assert diff < 1e-5, f"merged model must compute the injection-free adapter: max diff {diff:.2e}"


# --------------------------------------------------------------------------------------------
# Attaching adapters


def test_add_adapters_wraps_the_targets_of_the_chosen_blocks_and_freezes_the_rest():
    model = add_adapters(tiny_model(), targets=("wq", "w2"), r=R, alpha=ALPHA, layers=[0, 2])
    assert sorted(adapted_linears(model)) == ["layers.0.attention.wq", "layers.0.feed_forward.w2",
                                              "layers.2.attention.wq", "layers.2.feed_forward.w2"]
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {f"{path}.{kind}" for path in adapted_linears(model) for kind in ("lora_A", "lora_B")}
    assert adapter_config(model) == dict(r=R, alpha=ALPHA, dropout=0.05, dora=False, targets=["wq", "w2"],
                                         layers=[0, 2])
    assert set(adapter_state(model)) == names


@pytest.mark.parametrize("kwargs, message", [
    (dict(targets=("wx",)), "unknown adapter targets"),
    (dict(layers=[3]), "not blocks"),
])
def test_add_adapters_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        add_adapters(tiny_model(), **kwargs)


def test_add_adapters_twice_is_an_error():
    model = add_adapters(tiny_model())
    with pytest.raises(ValueError, match="already has adapters"):
        add_adapters(model)


# --------------------------------------------------------------------------------------------
# Against peft


def peft_model_for(model, dora: bool, layers=None):
    """LlamaForCausalLM with `model`'s base weights, wrapped by peft with matching adapters.
    Call before add_adapters (hf_llama reads the plain state dict)."""
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=HF_TARGETS, lora_dropout=0.0, use_dora=dora,
                             layers_to_transform=layers)
    return peft.get_peft_model(hf_llama(model), config)


@pytest.mark.parametrize("dora", [False, True])
def test_logits_and_gradients_match_peft(dora):
    model = tiny_model()
    reference = peft_model_for(model, dora)
    add_adapters(model, r=R, alpha=ALPHA, dropout=0.0, dora=dora)
    randomize_adapters(model)
    copy_adapters_into_peft(model, reference)
    x = tokens()
    ours, theirs = model(x), reference(input_ids=x).logits
    diff = max_diff(ours, theirs)
    assert diff < 1e-5, f"logits: max diff {diff:.2e}"
    targets = tokens(seed=3)
    F.cross_entropy(ours.flatten(0, 1), targets.flatten()).backward()
    F.cross_entropy(theirs.flatten(0, 1), targets.flatten()).backward()
    ours_grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    theirs_grads = peft_gradients(model, reference)
    assert set(ours_grads) == set(theirs_grads)
    # Relative to each gradient's own size: the DoRA gradients are ~10x smaller than LoRA's here.
    relative = {n: max_diff(ours_grads[n], theirs_grads[n]) / ours_grads[n].abs().max().item() for n in ours_grads}
    worst = max(relative, key=relative.get)
    assert relative[worst] < 1e-5, f"gradients: max relative diff {relative[worst]:.2e} at {worst}"


@pytest.mark.parametrize("dora, layers", [(False, None), (True, None), (True, [1])])
def test_exported_adapter_loads_into_peft_with_our_logits(dora, layers, tmp_path):
    model = tiny_model()
    hf = hf_llama(model)
    add_adapters(model, r=R, alpha=ALPHA, dropout=0.0, dora=dora, layers=layers)
    randomize_adapters(model)
    export_peft(tmp_path, model, {"base_model_name_or_path": "tiny-llama"})
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == layers and sorted(config["target_modules"]) == sorted(HF_TARGETS)
    reference = peft.PeftModel.from_pretrained(hf, tmp_path)
    x = tokens()
    with torch.no_grad():
        diff = max_diff(model(x), reference(input_ids=x).logits)
    assert diff < 1e-5, f"logits: max diff {diff:.2e}"


@pytest.mark.parametrize("dora, layers", [(False, None), (True, None), (False, [0, 2])])
def test_import_of_a_peft_saved_adapter_gives_peft_logits(dora, layers, tmp_path):
    model = tiny_model()
    reference = peft_model_for(model, dora, layers)
    with torch.no_grad():  # peft's own init leaves B = 0; give it non-trivial weights
        g = torch.Generator().manual_seed(5)
        for name, p in reference.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))
    reference.save_pretrained(tmp_path)
    config = import_peft(tmp_path, model)
    assert config == dict(r=R, alpha=ALPHA, dropout=0.0, dora=dora, targets=["wq", "wk", "wv", "w2", "w3"],
                          layers=layers)
    x = tokens()
    with torch.no_grad():
        diff = max_diff(model(x), reference(input_ids=x).logits)
    assert diff < 1e-5, f"logits: max diff {diff:.2e}"


def test_export_then_import_is_exact(tmp_path):
    model = add_adapters(tiny_model(), r=R, alpha=ALPHA, dora=True, layers=[0, 1])
    randomize_adapters(model)
    export_peft(tmp_path, model)
    fresh = tiny_model()
    import_peft(tmp_path, fresh)
    exported, imported = adapter_state(model), adapter_state(fresh)
    assert exported.keys() == imported.keys() and all(torch.equal(exported[k], imported[k]) for k in exported)


# --------------------------------------------------------------------------------------------
# Merge, save, load


@pytest.mark.parametrize("dora", [False, True])
def test_merged_model_computes_the_adapted_model(dora):
    model = add_adapters(tiny_model(), r=R, alpha=ALPHA, dropout=0.0, dora=dora, layers=[0, 2])
    randomize_adapters(model)
    x = tokens()
    with torch.no_grad():
        before = model(x)
        merge(model)
        after = model(x)
    assert not adapted_linears(model)
    assert type(model.layers[0].attention.wq) is nn.Linear
    diff = max_diff(before, after)
    assert diff < 1e-5, f"max diff {diff:.2e}"


@pytest.mark.parametrize("dora", [False, True])
def test_save_then_load_is_exact(dora, tmp_path):
    model = add_adapters(tiny_model(), r=R, alpha=ALPHA, dora=dora, layers=[1, 2])
    randomize_adapters(model)
    save_adapter(tmp_path, model, {"method": "lora", "r": 999})
    fresh = tiny_model()
    config = load_adapter(tmp_path, fresh)
    assert config["method"] == "lora" and config["r"] == R  # the adapter's own settings win
    saved, loaded = adapter_state(model), adapter_state(fresh)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
    assert not list(tmp_path.glob("*.tmp"))


def saved_adapter(tmp_path, **kwargs):
    model = add_adapters(tiny_model(), **{"r": R, "alpha": ALPHA, **kwargs})
    save_adapter(tmp_path, model)
    return tmp_path / "adapter.safetensors"


@pytest.mark.parametrize("saved, model_adapters, message", [
    (dict(r=R), dict(r=2 * R), "rank r"),
    (dict(dora=True), dict(dora=False), "dora"),
    (dict(layers=[0]), dict(layers=[1]), "layers"),
])
def test_load_into_mismatched_adapters_names_the_file(saved, model_adapters, message, tmp_path):
    saved_adapter(tmp_path, **saved)
    model = add_adapters(tiny_model(), **{"r": R, "alpha": ALPHA, **model_adapters})
    with pytest.raises(ValueError, match=f"adapter_config.json.*{message}"):
        load_adapter(tmp_path, model)


def test_load_with_a_missing_tensor_names_the_file(tmp_path):
    file = saved_adapter(tmp_path)
    tensors = load_file(str(file))
    del tensors["layers.1.attention.wq.lora_B"]
    save_file(tensors, str(file))
    with pytest.raises(ValueError, match=r"adapter\.safetensors.*missing \['layers\.1\.attention\.wq\.lora_B'\]"):
        load_adapter(tmp_path, tiny_model())


def test_load_with_a_wrong_shape_names_the_file(tmp_path):
    file = saved_adapter(tmp_path)
    tensors = load_file(str(file))
    tensors["layers.0.feed_forward.w2.lora_A"] = torch.zeros(R, 7)
    save_file(tensors, str(file))
    with pytest.raises(ValueError, match=r"adapter\.safetensors.*lora_A has shape \(4, 7\)"):
        load_adapter(tmp_path, tiny_model())


def test_load_of_a_rank_the_config_does_not_state_names_the_file(tmp_path):
    file = saved_adapter(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "r": 2 * R}))
    with pytest.raises(ValueError, match=r"adapter\.safetensors.*has shape"):
        load_adapter(tmp_path, tiny_model())
    assert file.exists()


@pytest.mark.parametrize("setting", [{"use_rslora": True}, {"r": None, "lora_alpha": None},
                                     {"target_modules": ["lm_head"]}])
def test_import_of_an_unsupported_peft_adapter_names_the_file(setting, tmp_path):
    model = add_adapters(tiny_model(), r=R, alpha=ALPHA)
    export_peft(tmp_path, model)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config.update(setting)
    (tmp_path / "adapter_config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    with pytest.raises(ValueError, match=r"adapter_config\.json: "):
        import_peft(tmp_path, tiny_model())
