"""llama.py and data/tokenizer.py against independent references: HF transformers' LlamaForCausalLM
on the same weights, real trained weights (stories260K) with golden greedy ids, and the real Meta
tokenizer files with llama.cpp's test vectors."""

import dataclasses
import json
import shutil

import pytest
import torch

import eval as evaluator
import llama
from conftest import ASSETS
from data.tokenizer import Tokenizer
from reference import hf_llama, write_hf_folder, write_meta_folder
from scripts import convert_hf

STORIES = ASSETS / "models" / "stories260K-meta"
LLAMA2_TOKENIZER = ASSETS / "models" / "llama2-tokenizer" / "tokenizer.model"
LLAMA3_TOKENIZER = ASSETS / "models" / "llama3-tokenizer" / "tokenizer.model"
VECTORS = ASSETS / "models" / "tokenizer-test-vectors"

# Tiny random configs shaped like the three families (the property each one exercises).
SHAPES = {
    "llama1_mha": llama.ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=101, multiple_of=32),
    "llama2_70b_gqa_ffn_multiplier": llama.ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=101,
                                                     multiple_of=16, ffn_dim_multiplier=1.3),
    "llama3_gqa_theta_scaled_rope": llama.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=101,
                                                    multiple_of=32, rope_theta=500000.0, use_scaled_rope=True),
}


def random_model(args: llama.ModelArgs, seed=0) -> llama.Transformer:
    torch.manual_seed(seed)
    model = llama.Transformer(args)
    with torch.no_grad():
        for p in model.parameters():  # random norms too, so a wrong norm cannot hide
            p.normal_(0, 0.3) if p.ndim > 1 else p.uniform_(0.5, 1.5)
    return model.eval()


def max_diff(a, b):
    d = (a.float() - b.float()).abs().max().item()
    assert d == d, "NaN"
    return d


def test_ffn_width_meta_rule():
    assert llama.ModelArgs(dim=4096).hidden_dim == 11008  # LLaMA-7B
    assert llama.ModelArgs(dim=4096, ffn_dim_multiplier=1.3, multiple_of=1024).hidden_dim == 14336  # Llama-3-8B
    assert llama.ModelArgs(dim=8192, ffn_dim_multiplier=1.3, multiple_of=4096).hidden_dim == 28672  # 70B


@pytest.mark.parametrize("shape", SHAPES)
def test_logits_match_transformers(shape):
    model = random_model(SHAPES[shape])
    tokens = torch.randint(0, 101, (3, 17))
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf_llama(model)(tokens).logits
    assert max_diff(ours, theirs) < 1e-4


@pytest.mark.parametrize("shape", SHAPES)
def test_left_padded_batch_matches_transformers_with_attention_mask(shape):
    model = random_model(SHAPES[shape])
    tokens = torch.randint(1, 101, (2, 12))
    valid = torch.ones_like(tokens, dtype=torch.bool)
    valid[0, :5] = False  # left padding
    tokens[0, :5] = 0
    positions = (valid.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(tokens, positions, llama.attention_mask(valid, 12))
        theirs = hf_llama(model)(tokens, attention_mask=valid.long(), position_ids=positions).logits
    assert max_diff(ours[valid], theirs[valid]) < 1e-4


@pytest.mark.parametrize("tied", [False, True])
def test_converted_hf_folder_loads_to_same_logits(tmp_path, tied):
    args = SHAPES["llama3_gqa_theta_scaled_rope"]
    model = random_model(args)
    if tied:
        model.output.weight.data.copy_(model.tok_embeddings.weight)
    write_hf_folder(model, tmp_path / "hf", tied=tied)
    convert_hf.convert(tmp_path / "hf", tmp_path / "meta")
    written = llama.ModelArgs.from_params_json(tmp_path / "meta" / "params.json")
    assert written.ffn_hidden_dim == written.hidden_dim == args.hidden_dim  # HF's intermediate_size, exactly
    assert dataclasses.replace(written, multiple_of=args.multiple_of, ffn_hidden_dim=None) == args
    loaded, tokenizer = llama.load(tmp_path / "meta", dtype=torch.float32)
    assert tokenizer is None
    # the weights written are the ones read from the HF folder directly, bit for bit
    _, direct, _ = convert_hf.read_hf_folder(tmp_path / "hf")
    assert direct.keys() == loaded.state_dict().keys()
    assert all(torch.equal(direct[k], v) for k, v in loaded.state_dict().items())
    saved = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    assert saved["output.weight"].untyped_storage().data_ptr() != saved["tok_embeddings.weight"].untyped_storage().data_ptr()
    tokens = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        assert max_diff(loaded(tokens), model(tokens)) == 0


def test_an_hf_folder_is_converted_first_and_a_converted_folder_is_not_overwritten(tmp_path, capsys):
    write_hf_folder(random_model(SHAPES["llama1_mha"]), tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="python scripts/convert_hf.py"):
        llama.load(tmp_path / "hf")
    convert_hf.main([str(tmp_path / "hf"), str(tmp_path / "meta")])
    before = (tmp_path / "meta" / "consolidated.00.pth").read_bytes()
    with pytest.raises(SystemExit, match="--overwrite"):
        convert_hf.main([str(tmp_path / "hf"), str(tmp_path / "meta")])
    (tmp_path / "meta" / "consolidated.01.pth").write_bytes(before)  # a shard of an older conversion
    convert_hf.main([str(tmp_path / "hf"), str(tmp_path / "meta"), "--overwrite"])
    assert sorted(f.name for f in (tmp_path / "meta").iterdir()) == ["consolidated.00.pth", "params.json"]
    with pytest.raises(SystemExit, match="the HF folder itself"):
        convert_hf.main([str(tmp_path / "hf"), str(tmp_path / "hf"), "--overwrite"])


def test_hf_config_rejects_what_it_cannot_compute(tmp_path):
    write_hf_folder(random_model(SHAPES["llama1_mha"]), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for change in ({"attention_bias": True}, {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}):
        (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match="config.json"):
            convert_hf.convert(tmp_path, tmp_path / "meta")
    assert not (tmp_path / "meta").exists()  # nothing written before the checks


def test_stories260k_golden_greedy_ids_fp32():
    golden = json.loads((STORIES / "golden.json").read_text())
    model, _ = llama.load(STORIES, dtype=torch.float32)
    new = evaluator.generate(model, [golden["prompt_ids"]], len(golden["greedy_ids"]) - 1, stop_ids=[])
    assert golden["prompt_ids"] + new[0] == golden["greedy_ids"]
    logits = model(torch.tensor([[1]]))[0, -1]
    assert logits.argmax().item() == 403 and abs(logits.max().item() - 17.0235) < 1e-3


def test_batched_greedy_equals_one_at_a_time():
    model, _ = llama.load(STORIES, dtype=torch.float32)
    golden = json.loads((STORIES / "golden.json").read_text())["greedy_ids"]
    prompts = [golden[:n] for n in (1, 9, 4, 17, 2)]
    batched = evaluator.generate(model, prompts, 12, stop_ids={golden[9]})
    single = [evaluator.generate(model, [p], 12, stop_ids={golden[9]})[0] for p in prompts]
    assert batched == single
    assert batched[0] == golden[1:9]  # stopped before the stop id


def split_checkpoint(src, dst, n, embedding_dim):
    """Split a one-shard Meta checkpoint by Meta's model-parallel rules."""
    state = torch.load(src / "consolidated.00.pth", weights_only=True)
    along = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1,
             "tok_embeddings": embedding_dim}
    shards = [{} for _ in range(n)]
    for key, tensor in state.items():
        dim = next((d for name, d in along.items() if f"{name}." in key or key.startswith(name)), None)
        for i in range(n):
            shards[i][key] = tensor.clone() if dim is None else tensor.chunk(n, dim)[i].clone()
    dst.mkdir()
    shutil.copy(src / "params.json", dst / "params.json")
    for i, shard in enumerate(shards):
        torch.save(shard, dst / f"consolidated.{i:02d}.pth")
    return dst


@pytest.mark.parametrize("n,embedding_dim", [(2, 1), (4, 1), (4, 0)])
def test_model_parallel_shards_load_to_identical_logits(tmp_path, n, embedding_dim):
    reference, _ = llama.load(STORIES, dtype=torch.float32)
    sharded, _ = llama.load(split_checkpoint(STORIES, tmp_path / "sharded", n, embedding_dim), dtype=torch.float32)
    tokens = torch.tensor([[1, 403, 407, 261, 378]])
    with torch.no_grad():
        assert torch.equal(reference(tokens), sharded(tokens))


def test_load_is_bf16_by_default_and_leaves_nothing_on_meta():
    model, _ = llama.load(STORIES)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(t.is_meta for t in list(model.parameters()) + [model.rope])
    assert model(torch.tensor([[1, 403]])).isfinite().all()


# ---- bad input: one clear error naming the file


def test_error_missing_params_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no params.json"):
        llama.load(tmp_path)


def test_error_no_shards(tmp_path):
    shutil.copy(STORIES / "params.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="consolidated"):
        llama.load(tmp_path)


def test_error_shard_count_does_not_match_params(tmp_path):
    split_checkpoint(STORIES, tmp_path / "two", 2, 1)
    (tmp_path / "two" / "consolidated.01.pth").unlink()  # one of two shards missing
    with pytest.raises(ValueError, match="does not make"):
        llama.load(tmp_path / "two")


def test_error_shape_does_not_match_params(tmp_path):
    shutil.copy(STORIES / "consolidated.00.pth", tmp_path)
    params = json.loads((STORIES / "params.json").read_text())
    (tmp_path / "params.json").write_text(json.dumps({**params, "dim": 128}))
    with pytest.raises(ValueError, match=str(tmp_path)):
        llama.load(tmp_path)


def test_error_tokenizer_vocab_differs_from_checkpoint(tmp_path):
    for f in ("params.json", "consolidated.00.pth"):
        shutil.copy(STORIES / f, tmp_path)
    shutil.copy(LLAMA2_TOKENIZER, tmp_path / "tokenizer.model")  # 32000 tokens vs 512
    with pytest.raises(ValueError, match=r"tokenizer.model: tokenizer has 32000 tokens .* vocab_size 512"):
        llama.load(tmp_path)


def test_error_unreadable_shard_and_unknown_param(tmp_path):
    shutil.copy(STORIES / "params.json", tmp_path)
    (tmp_path / "consolidated.00.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="consolidated.00.pth: cannot read weights"):
        llama.load(tmp_path)
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layer": 5}))
    with pytest.raises(ValueError, match=r"params.json: unknown params.json keys \['n_layer'\]"):
        llama.load(tmp_path)


# ---- tokenizers


def vector_texts():
    texts = (VECTORS / "ggml-vocab-llama.inp").read_text().split("\n__ggml_vocab_test__\n")[:-1]
    return texts


@pytest.mark.parametrize("path,expected_file,n_words", [
    (LLAMA2_TOKENIZER, "ggml-vocab-llama-spm.gguf.out", 32000),
    (LLAMA3_TOKENIZER, "ggml-vocab-llama-bpe.gguf.out", 128256),
])
def test_tokenizer_matches_llamacpp_vectors(path, expected_file, n_words):
    tok = Tokenizer(path)
    assert tok.n_words == n_words
    lines = (VECTORS / expected_file).read_text().split("\n")
    texts = vector_texts()[: len(lines) - 1]  # the spm file covers the first 43 of 44 tests
    assert len(texts) >= 43
    for text, line in zip(texts, lines):
        assert tok.encode(text) == [int(t) for t in line.split()], repr(text)


def test_tokenizer_special_ids_and_round_trip():
    sp, tt = Tokenizer(LLAMA2_TOKENIZER), Tokenizer(LLAMA3_TOKENIZER)
    assert (sp.bos_id, sp.eos_id, sp.pad_id, sp.stop_ids) == (1, 2, 0, {2})
    assert (tt.bos_id, tt.eos_id, tt.stop_ids) == (128000, 128001, {128001, 128009})
    assert tt.encode("This is a test sentence.", bos=True, eos=True) == [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert sp.encode("Hello world", bos=True) == [1, 15043, 3186]
    text = "the correct answer is answer3\n\n### Response:"
    assert sp.decode(sp.encode(text)) == text and tt.decode(tt.encode(text)) == text
    # special-token text in data stays text
    assert 128009 not in tt.encode("<|eot_id|>")


def test_tokenizer_rejects_garbage(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="tokenizer.model"):
        Tokenizer(bad)


def test_vocab_size_minus_one_takes_the_tokenizers(tmp_path):
    """LLaMA 1's params.json says vocab_size -1; Meta's download puts tokenizer.model one folder up."""
    model = random_model(llama.ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=32000, multiple_of=32))
    folder = write_meta_folder(model, tmp_path / "7B")
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({**params, "vocab_size": -1}))
    with pytest.raises(FileNotFoundError, match="vocab_size is -1 and there is no tokenizer"):
        llama.load(folder)
    shutil.copy(LLAMA2_TOKENIZER, tmp_path / "tokenizer.model")
    loaded, tokenizer = llama.load(folder, dtype=torch.float32)
    assert loaded.args.vocab_size == tokenizer.n_words == 32000
    tokens = torch.tensor([tokenizer.encode("Hello world", bos=True)])
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
