"""The published recipe is the default: each place we once departed from it, against the reference
that defines it (docs/recipe.md). References: `datasets`' train_test_split (LLM-Adapters' finetune.py
splits off its 120 validation records with it), peft's DoRA layer under dropout, transformers'
LLaMA loss, transformers 4.36.0's beam-search rule (written out below: 4.36 cannot be installed
beside transformers 5), and the recipe's settings as its scripts and README state them.
"""

import argparse

import datasets
import peft
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import eval as evaluator
import llama
import train
from data import batches, published
from echo_lora import LoRALinear, add_adapters
from reference import hf_llama

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


# --------------------------------------------------------------------------------------------
# Defaults


def test_training_defaults_are_the_recipe():
    """NVlabs/DoRA llama_7B_Dora.sh / llama2_7B_DoRA.sh / llama3_8B_DoRA.sh and LLM-Adapters'
    finetune.py: r 32, alpha 64, dropout 0.05, q k v up down, batch 16, 3 epochs, cutoff 256,
    120 validation records split with seed 42, 100 warm-up steps; group_by_length=False,
    train_on_inputs=True; and no departure flag on."""
    cfg = train.parse_config(["--ckpt", "llama-7b", "--method", "lora"])
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.targets) == (32, 64, 0.05, "wq,wk,wv,w3,w2")
    assert (cfg.batch_size, cfg.epochs, cfg.cutoff, cfg.val_size, cfg.val_seed, cfg.warmup_steps) == \
        (16, 3, 256, 120, 42, 100)
    assert not (cfg.answer_only_loss or cfg.token_mean_loss or cfg.group_by_length or cfg.adapter_only_dropout)


# The lr column of NVlabs/DoRA's commonsense README, rows r = 32 (DoRA's scripts pass the same).
README_LR = {("lora", "llama-7b"): 3e-4, ("lora", "llama2-7b"): 3e-4, ("lora", "llama3-8b"): 3e-4,
             ("dora", "llama-7b"): 1e-4, ("dora", "llama2-7b"): 2e-4, ("dora", "llama3-8b"): 1e-4}


@pytest.mark.parametrize("method,model", list(README_LR))
def test_default_lr_is_the_published_rows_lr(method, model):
    for variant in (method, f"echo-{method}"):
        assert train.parse_config(["--ckpt", f"checkpoints/{model}", "--method", variant]).lr == README_LR[method, model]
    assert published.PUBLISHED_LR[{"lora": "LoRA r=32", "dora": "DoRA r=32"}[method]][model] == README_LR[method, model]


def test_evaluation_defaults_are_the_protocol(monkeypatch):
    """commonsense_evaluate.py: num_beams=4, max_new_tokens=32, under transformers 4.36.0 (DoRA's pin)."""
    args = evaluator.parse_args(["--ckpt", "llama-7b"])
    assert (args.num_beams, args.max_new_tokens, args.beam_rule, args.scoring) == \
        (4, 32, "transformers-4.36", "generate")
    # ... with the model in fp16 (torch_dtype=torch.float16, then model.half()) on a GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert evaluator.parse_args(["--ckpt", "llama-7b", "--device", "cuda"]).precision == "fp16"
    assert evaluator.EVAL_PRECISIONS["fp16"] == torch.float16


# --------------------------------------------------------------------------------------------
# Validation records and batch order


@pytest.mark.parametrize("n", [121, 1000, 170_420])
def test_validation_split_is_datasets_train_test_split(n):
    reference = datasets.Dataset.from_dict({"i": list(range(n))}).train_test_split(test_size=120, shuffle=True,
                                                                                    seed=42)
    train_idx, val_idx = batches.split_validation(n, 120, 42)
    assert val_idx == reference["test"]["i"]
    assert train_idx == reference["train"]["i"]


def test_random_batches_cover_every_example_once_in_a_seeded_random_order():
    drawn = batches.random_batches(37, 8, seed=5)
    assert [len(b) for b in drawn] == [8, 8, 8, 8, 5]
    order = [i for b in drawn for i in b]
    assert sorted(order) == list(range(37)) and order != list(range(37))
    assert drawn == batches.random_batches(37, 8, seed=5) != batches.random_batches(37, 8, seed=6)


# --------------------------------------------------------------------------------------------
# DoRA under dropout: peft's function by default, ours only with --adapter-only-dropout


class FixedDropout(nn.Module):
    """Dropout with a given keep-mask, so peft and ours drop exactly the same inputs."""

    def __init__(self, keep: torch.Tensor, p: float):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x):
        return x * self.keep / (1 - self.p) if self.training else x


class OneLinear(nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


def dora_pair(p: float, adapter_only: bool):
    """Our DoRA layer and peft's on the same weights, both in training mode, one fixed mask."""
    torch.manual_seed(0)
    base = nn.Linear(24, 16, bias=False)
    x = torch.randn(3, 5, 24)
    keep = (torch.rand(x.shape) > p).float()
    theirs = peft.get_peft_model(OneLinear(nn.Linear(24, 16, bias=False)),
                                 peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], lora_dropout=p,
                                                 use_dora=True))
    peft_layer = theirs.base_model.model.proj
    ours = LoRALinear(base, r=4, alpha=8, dropout=p, dora=True, adapter_only_dropout=adapter_only)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        ours.lora_A.copy_(torch.randn(ours.lora_A.shape, generator=g) * 0.3)
        ours.lora_B.copy_(torch.randn(ours.lora_B.shape, generator=g) * 0.3)
        ours.magnitude.mul_(1 + 0.5 * torch.rand(ours.magnitude.shape, generator=g))
        peft_layer.base_layer.weight.copy_(base.weight)
        peft_layer.lora_A["default"].weight.copy_(ours.lora_A)
        peft_layer.lora_B["default"].weight.copy_(ours.lora_B)
        peft_layer.lora_magnitude_vector["default"].weight.copy_(ours.magnitude)
    ours.dropout = FixedDropout(keep, p)
    peft_layer.lora_dropout["default"] = FixedDropout(keep, p)
    ours.train(), theirs.train()
    grads = lambda: [ours.lora_A.grad, ours.lora_B.grad, ours.magnitude.grad]  # noqa: E731
    peft_grads = lambda: [peft_layer.lora_A["default"].weight.grad, peft_layer.lora_B["default"].weight.grad,  # noqa: E731
                          peft_layer.lora_magnitude_vector["default"].weight.grad]
    return ours, theirs, x, grads, peft_grads


def test_dora_under_dropout_is_pefts_function_with_the_same_mask():
    ours, theirs, x, grads, peft_grads = dora_pair(p=0.3, adapter_only=False)
    y, y_ref = ours(x), theirs(x)
    diff = (y - y_ref).abs().max().item()
    assert diff < 1e-5, f"outputs: max diff {diff:.2e} (scale {y_ref.abs().max().item():.2f})"
    target = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    (y * target).sum().backward()
    (y_ref * target).sum().backward()
    for name, g, g_ref in zip(("lora_A", "lora_B", "magnitude"), grads(), peft_grads()):
        relative = ((g - g_ref).abs().max() / g_ref.abs().max()).item()
        assert relative < 1e-5, f"{name} gradient: max relative diff {relative:.2e}"


def test_adapter_only_dropout_is_a_different_training_function_and_the_same_at_inference():
    ours, theirs, x, _, _ = dora_pair(p=0.3, adapter_only=True)
    diff = (ours(x) - theirs(x)).abs().max().item()
    assert diff > 1e-2, f"the departure should change the training function (max diff {diff:.2e})"
    ours.eval(), theirs.eval()
    diff = (ours(x) - theirs(x)).abs().max().item()
    assert diff < 1e-5, f"eval mode: max diff {diff:.2e}"


# --------------------------------------------------------------------------------------------
# The loss: the whole text, each micro-batch its own mean


def recipe_examples():
    g = torch.Generator().manual_seed(1)
    examples = []
    for length in (9, 4, 12, 7, 5, 10):
        ids = [1] + torch.randint(3, 50, (length - 1,), generator=g).tolist()
        examples.append((ids, [-100] * (length // 2) + ids[length // 2:]))
    return examples


def step_loss(model, examples, echo=None, routed=None, **flags):
    """train.accumulate_gradients' CE of one step of 6 examples in micro-batches of 2, on a CPU."""
    cfg = train.Config(batch_size=6, micro_batch_size=2, precision="fp32", **flags)
    routed = torch.zeros(6, dtype=torch.bool) if routed is None else routed
    losses, _ = train.accumulate_gradients(model, echo, examples, routed, cfg, 0, torch.device("cpu"), 1, 0)
    return losses


def test_whole_text_loss_is_transformers_loss_averaged_over_micro_batches():
    """The recipe's step loss with micro-batches of 2 out of 6, as train.py computes it (each
    micro-batch in length-sorted parts): the mean of LlamaForCausalLM's own loss (labels = input
    ids, -100 at padding) over the three micro-batches, each padded to its longest."""
    torch.manual_seed(0)
    model = llama.Transformer(llama.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50,
                                              multiple_of=16)).eval()
    hf = hf_llama(model)
    examples = recipe_examples()
    reference = 0.0
    with torch.no_grad():
        for start in range(0, 6, 2):
            batch = batches.collate(examples[start:start + 2], train_on_inputs=True, pad_id=0)
            labels = torch.where(batch.real, batch.tokens, -100)
            reference += hf(input_ids=batch.tokens, attention_mask=batch.real.long(), labels=labels).loss.item() / 3
    add_adapters(model, dropout=0.0)  # B = 0: the base model's function, with something to train
    ours = step_loss(model, examples)[0].item()
    assert abs(ours - reference) < 1e-5, f"{ours} vs {reference}"
    # The departure: one mean over all the step's tokens, which weights micro-batches by their size.
    token_mean = step_loss(model, examples, token_mean_loss=True)[0].item()
    assert abs(token_mean - reference) > 1e-3


@pytest.mark.parametrize("method", ["lora", "echo-dora"])
def test_length_sorted_parts_give_the_padded_micro_batch_loss_and_gradients(method, monkeypatch):
    """A micro-batch computed as length-sorted parts (batches.padded_parts) against the same
    micro-batch padded to its longest as one forward pass: the same loss and adapter (and Echo
    path) gradients up to float rounding (relative 1e-5, fp32), with trained (non-zero) adapters
    and dropout off (dropout draws depend on the grouping)."""
    from echo_lora import EchoConfig, EchoPath

    def run(rows_per_part):
        monkeypatch.setattr(batches, "ROWS_PER_PART", rows_per_part)
        torch.manual_seed(0)
        model = llama.Transformer(llama.ModelArgs(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=50,
                                                  multiple_of=16))
        add_adapters(model, dropout=0.0, dora="dora" in method)
        for p in model.parameters():
            if p.requires_grad:
                p.data += 0.1 * torch.randn_like(p)
        echo = EchoPath(model, EchoConfig()) if "echo" in method else None
        model.train()
        routed = torch.tensor([True, False, True, True, False, True])
        examples = recipe_examples() * 2  # micro-batches of 6: parts of 1 and 2 rows
        cfg = train.Config(batch_size=12, micro_batch_size=6, precision="fp32")
        losses, _ = train.accumulate_gradients(model, echo, examples, routed.repeat(2), cfg, 0,
                                               torch.device("cpu"), 1, 0)
        params = [p for p in model.parameters() if p.requires_grad] + (list(echo.parameters()) if echo else [])
        return losses, torch.cat([p.grad.flatten() for p in params])

    padded_losses, padded_grads = run(rows_per_part=6)
    parts_losses, parts_grads = run(rows_per_part=4)
    assert torch.isfinite(padded_grads).all() and padded_losses[0] > 0 and (padded_losses[1] > 0) == ("echo" in method)
    assert torch.allclose(parts_losses, padded_losses, rtol=1e-5, atol=0)
    assert (parts_grads - padded_grads).norm() <= 1e-5 * padded_grads.norm()


# --------------------------------------------------------------------------------------------
# Beam search: transformers 4.36.0's rule, written out


def reference_beam_search(model, prompt, num_beams, max_new_tokens, eos_id, rule, length_penalty=1.0):
    """One prompt, recomputed from scratch every step, as transformers 4.36.0's beam_search with
    BeamSearchScorer and BeamHypotheses (early_stopping=False, one EOS id) runs it:
    - topk 2 * num_beams candidates of log-softmax + beam score; beams 1.. start at -1e9;
    - an EOS candidate ranked below num_beams is skipped; above, it is added as a hypothesis
      scored sum / (tokens generated, EOS counted) ** length_penalty; the first num_beams
      non-EOS candidates go on;
    - a hypothesis joins when fewer than num_beams are kept or it beats the worst; then the worst
      is dropped (on a tie the earlier one);
    - done when num_beams are kept and worst >= best / generated ** length_penalty, where best is
      next_scores.max() (4.36: EOS candidates included) or the best running beam (transformers 5);
    - at max_new_tokens, if not done, every running beam is added (finalize); the answer is the
      highest-scoring hypothesis (on a tie the one added later, as sorted(...).pop() picks)."""
    hyps, worst = [], 1e9

    def add_hypothesis(sum_logprobs, ids, generated_len):
        nonlocal worst
        score = sum_logprobs / generated_len ** length_penalty
        if len(hyps) < num_beams or score > worst:
            hyps.append((score, ids))
            if len(hyps) > num_beams:
                ranked = sorted((s, i) for i, (s, _) in enumerate(hyps))
                del hyps[ranked[0][1]]
                worst = ranked[1][0]
            else:
                worst = min(score, worst)

    beams = [(0.0, [])] + [(-1e9, [])] * (num_beams - 1)
    for step in range(1, max_new_tokens + 1):
        with torch.no_grad():
            logprobs = torch.stack([F.log_softmax(model(torch.tensor([prompt + ids]))[0, -1].float(), -1)
                                    for _, ids in beams])
        scores = logprobs + torch.tensor([s for s, _ in beams])[:, None]
        top, index = scores.flatten().topk(2 * num_beams)
        vocab = scores.shape[1]
        running = []
        for rank, (score, i) in enumerate(zip(top.tolist(), index.tolist())):
            parent, token = divmod(i, vocab)
            if token == eos_id:
                if rank < num_beams:
                    add_hypothesis(score, beams[parent][1], step)
            else:
                running.append((score, beams[parent][1] + [token]))
            if len(running) == num_beams:
                break
        best = top[0].item() if rule == "transformers-4.36" else running[0][0]
        beams = running
        if len(hyps) >= num_beams and worst >= best / step ** length_penalty:
            break
    else:
        for score, ids in beams:
            add_hypothesis(score, ids, len(ids))
    return sorted(hyps, key=lambda h: h[0]).pop()[1]


@pytest.fixture(scope="module")
def eager_model():
    """A small-vocabulary model whose replies often end: EOS is among the candidates at most steps,
    which is where the two stopping rules part."""
    torch.manual_seed(0)
    model = llama.Transformer(llama.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=24,
                                              multiple_of=16)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0, 0.3)
        model.output.weight[2] += 0.8  # EOS (id 2) a little more likely everywhere
    return model


def test_beam_search_follows_the_rule_it_names(eager_model):
    g = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(3, 24, (int(n),), generator=g).tolist()
               for n in torch.randint(2, 9, (300,), generator=g)][:100]  # 2 of these 100 part the rules
    outputs = {}
    for rule in evaluator.BEAM_RULES:
        ours = evaluator.beam_search(eager_model, prompts, 4, 10, {2}, pad_id=0, rule=rule)
        reference = [reference_beam_search(eager_model, p, 4, 10, 2, rule) for p in prompts]
        mismatches = sum(a != b for a, b in zip(ours, reference))
        assert mismatches == 0, f"{rule}: {mismatches} of {len(prompts)} prompts differ from the rule written out"
        outputs[rule] = ours
    parted = sum(a != b for a, b in zip(*outputs.values()))
    assert parted > 0, "the two rules should give different answers on some of these prompts"
    assert any(len(ids) < 10 for ids in outputs["transformers-4.36"]), "some replies should end with EOS"


# --------------------------------------------------------------------------------------------
# The results table: published rows only beside runs of their protocol


def eval_args(**overrides):
    args = dict(num_beams=4, max_new_tokens=32, beam_rule="transformers-4.36", scoring="generate", limit=None,
                adapter="out/x", published="llama-7b", precision="fp16")
    return argparse.Namespace(**{**args, **overrides})


RECIPE_RUN = {"r": 32, "lr": 1e-4, "answer_only_loss": False, "token_mean_loss": False, "group_by_length": False,
              "adapter_only_dropout": False}


def test_published_rows_are_printed_only_beside_runs_of_their_protocol():
    rows, notes = published.published_rows(eval_args(), RECIPE_RUN)
    assert list(rows) == ["DoRA r=32"] and rows["DoRA r=32"] == published.PUBLISHED["llama-7b"]["DoRA r=32"]
    assert notes == ["- LoRA r=32 (published) not shown: this run differs from its protocol in lr 0.0001 (row: 0.0003)."]
    rows, notes = published.published_rows(eval_args(num_beams=1), {**RECIPE_RUN, "answer_only_loss": True})
    assert rows == {}
    assert "num-beams 1 (row: 4); answer-only loss." in notes[1]
    rows, notes = published.published_rows(eval_args(precision="bf16"), RECIPE_RUN)
    assert rows == {} and notes[1].endswith("in bf16 weights (row: fp16).")
    rows, notes = published.published_rows(eval_args(beam_rule="transformers-5", adapter=None), None)
    assert rows == {} and "beam-rule transformers-5 (row: transformers-4.36); the base model" in notes[0]
    # A config.json written before answer_only_loss existed: train_on_inputs False was answer-only.
    rows, notes = published.published_rows(eval_args(), {"r": 32, "lr": 1e-4, "train_on_inputs": False})
    assert rows == {} and notes[1].endswith("answer-only loss.")
