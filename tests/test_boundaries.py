"""Safe at the boundaries (docs/safety.md): one mechanism per class of hostile input, each where
files and flags enter (data/files.py, data/checkpoints.py, the command lines), and each fed here
real hostile inputs of its class."""

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager

import pytest
import sentencepiece
import torch
from safetensors.torch import load_file, save_file

import bench
import echo_lora
import eval as evaluator
import llama
import train
from conftest import ROOT
from data import checkpoints, download, prepare_smollm2
from data.commonsense import load_records
from data.files import RUN_MARKER, inside, locked_folder, read_json, recorded_command, recorded_path, write_atomically
from reference import write_hf_folder
from scripts import convert_hf
from test_safety import DATA, SHAPE, ckpt, meta_ckpt, records, train_args  # noqa: F401 (fixtures)

sys.path.insert(0, str(ROOT / "scripts"))
import experiment  # noqa: E402
from data.tokenizer import Tokenizer

SMALL = dict(dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16)  # no tokenizer needed


def small_model(seed=0) -> llama.Transformer:
    torch.manual_seed(seed)
    return llama.Transformer(llama.ModelArgs(**SMALL))


def meta_folder(folder, model=None):
    """A Meta-layout folder of SMALL's shape (params.json, consolidated.00.pth)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(SMALL))
    torch.save((model or small_model()).state_dict(), folder / "consolidated.00.pth")
    return folder


def same_weights(model, reference) -> bool:
    return all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


@contextmanager
def within(seconds: float):
    """Fail, rather than hang the suite, if the block blocks (a FIFO opened for reading)."""
    def blocked(*_):
        raise TimeoutError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, blocked)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def finished_run(ckpt, records, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "finished"
    train.main(train_args(ckpt, records, out))
    return out


def eval_args(ckpt, out, *extra):
    return ["--ckpt", str(ckpt), "--data-dir", str(DATA), "--datasets", "piqa", "--limit", "2", "--device", "cpu",
            "--num-beams", "1", "--max-new-tokens", "2", "--out", str(out), *extra]


# ---- 1. a name read from a file stays inside that file's folder


@pytest.mark.parametrize("name", ["../elsewhere/x.safetensors", "ABSOLUTE", "shards/../../elsewhere/x.safetensors"])
def test_an_hf_index_naming_files_outside_its_folder_is_refused(tmp_path, name):
    write_hf_folder(small_model(1), tmp_path / "elsewhere")  # weights a loader could be led to
    (tmp_path / "elsewhere" / "model.safetensors").rename(tmp_path / "elsewhere" / "x.safetensors")
    folder = write_hf_folder(small_model(), tmp_path / "ckpt")
    (folder / "model.safetensors").unlink()
    name = str(tmp_path / "elsewhere" / "x.safetensors") if name == "ABSOLUTE" else name
    keys = load_file(str(tmp_path / "elsewhere" / "x.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: name for k in keys}}))
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: .* is not a name inside"):
        convert_hf.convert(folder, tmp_path / "meta")


def test_inside_resolves_dot_dot_within_the_folder(tmp_path):
    assert inside(tmp_path, "a/../b.json", tmp_path / "x.json") == tmp_path / "b.json"
    with pytest.raises(ValueError, match="is not a name inside"):
        inside(tmp_path, "../b.json", tmp_path / "x.json")


# ---- 2. Meta shards: exactly consolidated.NN.pth, numbered 00 to K-1


def test_recorded_paths_are_relative_to_the_repository(tmp_path):
    """A run's files name no folder of the machine that made them: a path inside the repository is
    recorded relative to it, one outside it as given, every other argument as typed."""
    assert recorded_path(ROOT / "results" / "x" / ".." / "run") == "results/run"
    assert recorded_path(tmp_path / "run") == str(tmp_path / "run")
    argv = [str(ROOT / "train.py"), "--out", str(ROOT / "out" / "a b"), "--data", "data/x.json", "--seed", "1"]
    assert recorded_command(argv) == "train.py --out 'out/a b' --data data/x.json --seed 1"


def test_a_stray_file_the_loose_pattern_takes_is_ignored(tmp_path):
    real = small_model()
    folder = meta_folder(tmp_path, real)
    torch.save(small_model(1).state_dict(), folder / "consolidated.00.backup.pth")  # sorts first
    torch.save(small_model(2).state_dict(), folder / "consolidated.0.pth")
    assert same_weights(llama.load(folder, dtype=torch.float32)[0], real)


def test_a_gap_in_the_shard_numbers_or_a_stray_whole_copy_is_an_error(tmp_path):
    folder = meta_folder(tmp_path / "gap")
    torch.save(small_model(1).state_dict(), folder / "consolidated.02.pth")
    with pytest.raises(ValueError, match=r"shards 00, 02 but no consolidated\.01\.pth"):
        llama.load(folder)
    folder = meta_folder(tmp_path / "copy")
    torch.save(small_model(1).state_dict(), folder / "consolidated.01.pth")  # a whole model, not a shard
    with pytest.raises(ValueError, match=r"x 2 shards, which does not make"):
        llama.load(folder)
    (folder / "consolidated.00.pth").rename(folder / "consolidated.1.pth")
    (folder / "consolidated.01.pth").unlink()
    with pytest.raises(FileNotFoundError, match=r"no consolidated\.NN\.pth shards"):
        llama.load(folder)


# ---- 3. weights are floating point


def test_integer_and_bool_weights_are_an_error_naming_the_file_and_key(tmp_path):
    state = small_model().state_dict()
    state["layers.0.attention.wq.weight"] = state["layers.0.attention.wq.weight"].to(torch.int8)
    folder = meta_folder(tmp_path / "meta")
    torch.save(state, folder / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"consolidated\.00\.pth: layers\.0\.attention\.wq\.weight is int8"):
        llama.load(folder)
    folder = write_hf_folder(small_model(), tmp_path / "hf")
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"] > 0
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.safetensors: model\.layers\.0\.mlp\.up_proj\.weight is bool"):
        convert_hf.convert(folder, tmp_path / "meta")
    # an adapter's tensors too
    model = echo_lora.add_adapters(small_model(), r=2, alpha=4)
    echo_lora.save_adapter(tmp_path / "adapter", model)
    tensors = load_file(str(tmp_path / "adapter" / "adapter.safetensors"))
    tensors["layers.0.attention.wq.lora_A"] = tensors["layers.0.attention.wq.lora_A"].to(torch.int64)
    save_file(tensors, str(tmp_path / "adapter" / "adapter.safetensors"))
    with pytest.raises(ValueError, match=r"adapter\.safetensors: layers\.0\.attention\.wq\.lora_A is int64"):
        echo_lora.load_adapter(tmp_path / "adapter", small_model())


# ---- 4. a model that computes NaN is never scored


@pytest.mark.parametrize("weight, value", [("layers.0.feed_forward.w2.weight", float("nan")),
                                           ("output.weight", float("inf"))])
def test_non_finite_logits_stop_eval_with_one_line(tmp_path, capsys, weight, value):
    folder = meta_ckpt(tmp_path / "broken")
    state = torch.load(folder / "consolidated.00.pth", weights_only=True)
    state[weight][3, 1] = value
    torch.save(state, folder / "consolidated.00.pth")
    assert evaluator.main(eval_args(folder, tmp_path / "eval")) == 1
    assert f"{folder}: the model's logits on piqa item 0 are not finite" in one_line(capsys)
    assert not (tmp_path / "eval" / "results.json").exists()


@pytest.mark.parametrize("change", [{"norm_eps": -1}, {"rope_theta": 0}])
def test_a_model_description_that_computes_nan_is_refused_by_eval(tmp_path, capsys, change):
    folder = meta_ckpt(tmp_path / "bad", **change)
    assert evaluator.main(eval_args(folder, tmp_path / "eval")) == 1
    key = next(iter(change))
    assert f"params.json: '{key}' is {change[key]}, expected > 0 and finite" in one_line(capsys)


# ---- 5. run folders: recognised by train.py's record, one process's, removed only by name


def test_an_hf_model_folder_is_not_a_run_and_is_never_written_over(ckpt, records, tmp_path):
    folder = write_hf_folder(small_model(), tmp_path / "hf-model")
    before = {f.name: f.read_bytes() for f in folder.iterdir()}
    for flags in ((), ("--overwrite",), ("--resume",)):
        with pytest.raises(SystemExit, match=r"holds config\.json but no train\.py run record") as e:
            train.main(train_args(ckpt, records, folder, *flags))
        assert "\n" not in str(e.value)
    assert {f.name: f.read_bytes() for f in folder.iterdir() if f.name != ".lock"} == before
    assert not train.holds_run(folder)


def test_overwrite_removes_only_the_files_train_and_eval_write(finished_run, ckpt, records, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    eval_files = {"results.json": "{}", "results.md": "#", "predictions.jsonl": ""}
    mine = {"results_notes.md": "mine", "results-by-hand.json": "{}", "predictions-old.jsonl": "", "notes.txt": "x"}
    for name, text in {**eval_files, **mine}.items():
        (run / name).write_text(text)
    train.main(train_args(ckpt, records, run, "--overwrite", "--max-steps", "1"))
    assert not any((run / name).exists() for name in eval_files)
    assert all((run / name).read_text() == text for name, text in mine.items())
    assert read_json(run / "config.json")[RUN_MARKER] == 1


@contextmanager
def held_by_another_process(folder):
    """`folder`'s run lock held by a second process for the block (killed after it: a killed
    holder leaves no stale lock)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from data.files import locked_folder\n"
         f"with locked_folder({str(folder)!r}):\n    print('held', flush=True); time.sleep(60)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        yield
    finally:
        holder.kill()
        holder.wait()


def test_a_second_train_into_the_same_out_fails_with_one_line(ckpt, records, tmp_path):
    out = tmp_path / "run"
    with held_by_another_process(out):
        with pytest.raises(SystemExit, match=r"another process is writing a run there") as e:
            train.main(train_args(ckpt, records, out, "--max-steps", "1"))
        assert "\n" not in str(e.value) and not (out / "config.json").exists()
    train.main(train_args(ckpt, records, out, "--max-steps", "1"))  # a killed holder leaves no stale lock
    assert train.holds_run(out)
    with locked_folder(out):  # in-process too: the lock is the folder's, not the process's
        with pytest.raises(SystemExit, match="another process is writing a run there"):
            train.main(train_args(ckpt, records, out, "--resume", "--max-steps", "2"))


def test_temporary_files_are_fresh_names_never_a_planted_symlink(finished_run, ckpt, records, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    victims = {}
    for name in train.RUN_FILES:
        victims[name] = tmp_path / f"victim-{name}"
        victims[name].write_text("keep")
        (run / f".{name}.tmp").symlink_to(victims[name])  # the old fixed temporary names
    train.main(train_args(ckpt, records, run, "--overwrite", "--max-steps", "1"))
    assert all(v.read_text() == "keep" for v in victims.values())
    names = []
    write_atomically(tmp_path / "a.json", lambda tmp: names.append(tmp) or tmp.write_text("1"))
    write_atomically(tmp_path / "a.json", lambda tmp: names.append(tmp) or tmp.write_text("2"))
    assert names[0] != names[1] and all(n.name.startswith(".a.json.") and n.suffix == ".tmp" for n in names)
    assert (tmp_path / "a.json").read_text() == "2" and (tmp_path / "a.json").stat().st_mode & 0o777 != 0o600


def test_resume_needs_the_run_record(finished_run, ckpt, records, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "config.json").unlink()
    before = {f.name: f.read_bytes() for f in run.iterdir()}
    with pytest.raises(SystemExit, match=r"holds .*checkpoint\.pt.* but no train\.py run record .*not a run to resume"):
        train.main(train_args(ckpt, records, run, "--resume", "--lr", "1e-3", "--seed", "7"))
    with pytest.raises(SystemExit, match="not a run to replace"):  # nor written over without --resume
        train.main(train_args(ckpt, records, run))
    assert {f.name: f.read_bytes() for f in run.iterdir()} == before
    with pytest.raises(SystemExit, match="--resume given but there is no run there to resume"):
        train.main(train_args(ckpt, records, tmp_path / "empty", "--resume"))


# ---- 6. no abbreviated flags, in any parser


@pytest.mark.parametrize("entry_point, argv, flag", [
    (train.parse_config, ["--see", "7"], "--see"), (evaluator.parse_args, ["--ckpt", "x", "--data-d", "y"], "--data-d"),
    (bench.main, ["--ste", "3"], "--ste"), (download.main, ["--on", "boolq"], "--on"),
    (prepare_smollm2.main, ["--from-p", "x"], "--from-p"),
    # the experiment runner hands these to train.py's and eval.py's parsers: every seed 7, other test files
    (experiment.main, ["--out", "unused", "--train-flags=--see 7"], "--see"),
    (experiment.main, ["--out", "unused", "--eval-flags=--data-d OTHER"], "--data-d"),
], ids=["train", "eval", "bench", "download", "prepare_smollm2", "experiment-train", "experiment-eval"])
def test_an_abbreviated_flag_is_a_parse_error(capsys, entry_point, argv, flag):
    with pytest.raises(SystemExit) as e:
        entry_point(argv)
    assert e.value.code == 2
    assert f"unrecognized arguments: {flag}" in capsys.readouterr().err


# ---- 7. float flags are finite when parsed


@pytest.mark.parametrize("argv", [["--echo-distill", "nan"], ["--echo-tau", "inf"], ["--echo-route-p", "nan"],
                                  ["--alpha", "inf"], ["--lr", "inf"], ["--dropout", "nan"]])
def test_a_float_flag_that_is_not_finite_is_a_parse_error_naming_it(capsys, argv):
    with pytest.raises(SystemExit) as e:
        train.parse_config(argv)
    assert e.value.code == 2
    assert f"argument {argv[0]}: {argv[1]} is not a finite number" in capsys.readouterr().err
    assert train.parse_config(["--grad-clip", "inf"]).grad_clip == float("inf")  # documented: no clipping


# ---- 8. a model description checked once, where ModelArgs is made


@pytest.mark.parametrize("change, key, allowed", [
    ({"dim": -128}, "dim", "> 0"), ({"n_heads": 0}, "n_heads", "> 0"), ({"multiple_of": 0}, "multiple_of", ">= 1"),
    ({"max_seq_len": -5}, "max_seq_len", ">= 1"), ({"ffn_dim_multiplier": -1}, "ffn_dim_multiplier", "> 0"),
    ({"n_kv_heads": 3}, "n_kv_heads", "> 0 and a divisor of the 4 query heads"), ({"norm_eps": -1}, "norm_eps", "> 0"),
    ({"rope_theta": 0}, "rope_theta", "> 0"), ({"n_layers": 0}, "n_layers", "> 0"),
    ({"dim": 66}, "dim", "a multiple of 2 x 4 heads"), ({"vocab_size": 0}, "vocab_size", "> 0"),
])
def test_params_json_values_that_build_no_model_are_one_line(tmp_path, change, key, allowed):
    (tmp_path / "params.json").write_text(json.dumps({**SHAPE, **change}))
    with pytest.raises(ValueError, match=rf"params\.json: '{key}' is {list(change.values())[0]}, expected {allowed}") as e:
        llama.ModelArgs.from_params_json(tmp_path / "params.json")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("change, key", [
    ({"num_attention_heads": 0}, "num_attention_heads"), ({"rms_norm_eps": -1}, "rms_norm_eps"),
    ({"rope_parameters": {"rope_theta": 0, "rope_type": "default"}}, "rope_theta"),
    ({"max_position_embeddings": -5}, "max_position_embeddings"), ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"intermediate_size": 0}, "intermediate_size"),
])
def test_hf_config_values_that_build_no_model_name_the_hf_key(tmp_path, change, key):
    folder = write_hf_folder(llama.Transformer(llama.ModelArgs(**SHAPE)), tmp_path)
    (folder / "config.json").write_text(json.dumps({**read_json(folder / "config.json"), **change}))
    with pytest.raises(ValueError, match=rf"config\.json: '{key}' is "):
        convert_hf.read_hf_config(folder / "config.json")


def test_json_nan_huge_numbers_and_deep_nesting_are_one_line(tmp_path):
    params = tmp_path / "params.json"
    for text, why in [('{"dim": 64, "norm_eps": NaN}', "NaN is not a JSON number"),
                      ('{"dim": 1' + "0" * 100_000 + "}", "digits"), ("[" * 100_000 + "]" * 100_000, "")]:
        params.write_text(text)
        with pytest.raises(ValueError, match=rf"params\.json: cannot read JSON: .*{why}"):
            llama.ModelArgs.from_params_json(params)
    data = tmp_path / "records.json"
    data.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"records\.json: not valid JSON"):
        load_records(data)


# ---- 9. files and text the program cannot use: one line, before any work


@pytest.mark.parametrize("what", ["shard", "params", "adapter config", "adapter tensors", "data"])
def test_a_fifo_in_place_of_a_file_is_refused_not_waited_on(tmp_path, what):
    folder = meta_folder(tmp_path / "ckpt")
    model = echo_lora.add_adapters(small_model(), r=2, alpha=4)
    echo_lora.save_adapter(tmp_path / "adapter", model)
    fifo = {"shard": folder / "consolidated.00.pth", "params": folder / "params.json",
            "adapter config": tmp_path / "adapter" / "adapter_config.json",
            "adapter tensors": tmp_path / "adapter" / "adapter.safetensors", "data": tmp_path / "data.json"}[what]
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    with within(5), pytest.raises(ValueError, match=rf"{fifo.name}: a FIFO, not a regular file"):
        if what == "data":
            load_records(fifo)
        elif what.startswith("adapter"):
            echo_lora.load_adapter(tmp_path / "adapter", small_model())
        else:
            llama.load(folder)


def test_a_lone_surrogate_in_a_record_is_one_line_naming_the_file_and_record(ckpt, records, tmp_path, capsys):
    rows = json.loads(records.read_text())
    text = json.dumps(rows[:3]).replace(json.dumps(rows[1]["instruction"])[1:-1], "Which one? \\ud800", 1)
    bad = tmp_path / "surrogate.json"
    bad.write_text(text)
    with pytest.raises(SystemExit, match=r"surrogate\.json: record 1: key 'instruction' is not text") as e:
        train.main(train_args(ckpt, bad, tmp_path / "run"))
    assert "\n" not in str(e.value)
    tests = tmp_path / "tests" / "piqa"  # and in a test question
    tests.mkdir(parents=True)
    questions = load_records(DATA / "piqa" / "test.json")[:2]
    questions[0]["instruction"] = "Goal: \ud83d"
    (tests / "test.json").write_text(json.dumps(questions))
    assert evaluator.main(eval_args(ckpt, tmp_path / "eval", "--data-dir", str(tmp_path / "tests"))) == 1
    assert "test.json: record 0: key 'instruction' is not text" in one_line(capsys)


def test_a_sentencepiece_model_without_bos_or_eos_is_refused(tmp_path):
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(["the quick brown fox jumps over the lazy dog"] * 20), model_writer=model,
        vocab_size=30, model_type="bpe", bos_id=-1, eos_id=-1, unk_id=0, pad_id=-1, minloglevel=2,
        hard_vocab_limit=False)
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    with pytest.raises(ValueError, match=r"tokenizer\.model: a SentencePiece model without a BOS or EOS"):
        Tokenizer(tmp_path / "tokenizer.model")


def test_out_is_checked_before_the_model_loads(ckpt, records, tmp_path, capsys, monkeypatch):
    def loaded(*_):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(evaluator, "load_model", loaded)
    monkeypatch.setattr(train, "load_model", loaded)
    taken = tmp_path / "results.txt"
    taken.write_text("a file")
    for out in (taken, taken / "sub"):
        assert evaluator.main(eval_args(ckpt, out)) == 1
        assert f"--out {out}: {taken} is a file, not a folder" in one_line(capsys)
        with pytest.raises(SystemExit, match=f"--out {out}: {taken} is a file, not a folder"):
            train.main(train_args(ckpt, records, out))
    if os.geteuid() != 0:  # root may write anywhere
        (tmp_path / "read-only").mkdir(mode=0o555)
        assert evaluator.main(eval_args(ckpt, tmp_path / "read-only" / "eval")) == 1
        assert "is not writable" in one_line(capsys)


def test_a_broken_train_config_beside_the_adapter_fails_before_the_model_loads(ckpt, tmp_path, capsys, monkeypatch):
    model, _ = llama.load(ckpt, dtype=torch.float32)
    echo_lora.save_adapter(tmp_path / "adapter", echo_lora.add_adapters(model, r=2, alpha=4))
    (tmp_path / "adapter" / "config.json").write_text('{"echo_lora_run": 1, "config": ')  # cut short

    def loaded(*_):
        raise AssertionError("the model was loaded before the train config was read")

    monkeypatch.setattr(evaluator, "load_model", loaded)
    assert evaluator.main(eval_args(ckpt, tmp_path / "eval", "--adapter", str(tmp_path / "adapter"))) == 1
    assert "adapter/config.json: cannot read JSON" in one_line(capsys)


# ---- 10. eval.py's results and predictions: one unit (the experiment's table: tests/test_experiment.py)


def test_an_overwrite_cut_short_leaves_no_results_beside_old_predictions(ckpt, tmp_path, monkeypatch, capsys):
    out = tmp_path / "eval"
    assert evaluator.main(eval_args(ckpt, out)) == 0
    summary = read_json(out / "results.json")
    assert summary["predictions_sha256"] == hashlib.sha256((out / "predictions.jsonl").read_bytes()).hexdigest()
    original = evaluator.write_text

    def killed_after_the_predictions(path, text):
        if path.name == "results.md":
            raise KeyboardInterrupt("killed")
        original(path, text)

    monkeypatch.setattr(evaluator, "write_text", killed_after_the_predictions)
    with pytest.raises(KeyboardInterrupt):
        evaluator.main(eval_args(ckpt, out, "--overwrite", "--max-new-tokens", "3"))
    assert not (out / "results.json").exists()


def test_a_precision_the_cpu_emulates_is_named_before_the_run(monkeypatch):
    """bf16 on a CPU without bf16 instructions: its matmuls measured 30-60x slower than fp32
    (results/bench/NOTES.md). The warning says so; nothing is said where the precision runs fast, on a
    GPU or for fp32. Timing it leaves a seeded run's random stream untouched."""
    before = torch.get_rng_state()
    checkpoints.matmul_seconds(torch.bfloat16)
    assert torch.equal(torch.get_rng_state(), before)
    seconds = {torch.bfloat16: 3.0, torch.float16: 0.15, torch.float32: 0.1}
    monkeypatch.setattr(checkpoints, "matmul_seconds", lambda dtype: seconds[dtype])
    assert "a bf16 matmul runs 30x slower than fp32" in checkpoints.slow_precision_warning("cpu", "bf16", torch.bfloat16)
    assert checkpoints.slow_precision_warning("cpu", "fp16", torch.float16) is None  # 1.5x: not emulated
    assert checkpoints.slow_precision_warning("cpu", "fp32", torch.float32) is None
    assert checkpoints.slow_precision_warning("cuda", "bf16", torch.bfloat16) is None


# ---- the five cases left over, and one mechanism per class of hostile input


def refused_when_parsed(capsys, argv) -> str:
    """train.py's parser refuses argv: exit status 2 and its one `error:` line, no traceback."""
    with pytest.raises(SystemExit) as e:
        train.parse_config(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    [line] = [line for line in err.splitlines() if "error:" in line]
    return line


def refused_by_train(argv) -> str:
    """train.main(argv) stops with one line (its exit message: a non-zero exit), no traceback."""
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    message = str(e.value.code)
    assert e.value.code not in (0, None) and "\n" not in message and "Traceback" not in message
    return message


# F03 and every list flag: items of their kind, none empty, none given twice


@pytest.mark.parametrize("argv, why", [
    (["--echo-source-layers", "4,4,4,1"], "--echo-source-layers 4,4,4,1: gives 4 more than once"),  # F03
    (["--echo-source-layers", "a"], "--echo-source-layers a: 'a' is not a block number"),  # class 1's example
    (["--echo-target-layers", "2,02"], "--echo-target-layers 2,02: gives 2 more than once"),
    (["--echo-target-layers", "1,,2"], "--echo-target-layers 1,,2: '' is not a block number"),
    (["--echo-source-layers", "0"], "'0' is not a block number"),
    (["--echo-source-layers", "-1"], "'-1' is not a block number"),
    (["--echo-source-layers", "1.5"], "'1.5' is not a block number"),
    (["--targets", "wq,wv,wq"], "--targets wq,wv,wq: gives wq more than once"),
    (["--targets", "wq,"], "--targets wq,: '' is not a name"),
    (["--data", "a.json,b.json,a.json"], "--data a.json,b.json,a.json: gives a.json more than once"),  # E14
])
def test_a_list_flag_with_a_repeated_or_bad_item_is_a_parse_error(capsys, argv, why):
    assert why in refused_when_parsed(capsys, argv)


def test_list_flags_that_are_fine_still_parse():
    cfg = train.parse_config(["--echo-source-layers", "4,1", "--echo-target-layers", " 2, 3", "--targets", "wq,wv"])
    assert train.echo_config(cfg).source_layers == (4, 1) and train.echo_config(cfg).target_layers == (2, 3)


# E14: one dataset file given twice, under any name


@pytest.mark.parametrize("how", ["copy", "symlink", "dot-path", "hard link"])
def test_one_data_file_given_twice_under_another_name_is_one_line(ckpt, records, tmp_path, how):
    twin = tmp_path / "twin.json"
    if how == "copy":
        shutil.copy(records, twin)
    elif how == "symlink":
        twin.symlink_to(records)
    elif how == "hard link":
        os.link(records, twin)
    else:
        twin = f"{records.parent}/./{records.name}"  # a string: Path would drop the "."
    message = refused_by_train(train_args(ckpt, f"{records},{twin}", tmp_path / "run"))
    assert f"--data: {twin} holds the same records as {records}: one file given twice" in message
    assert not (tmp_path / "run" / "config.json").exists()


# F27: the embedded model's preset keys on the embedded default itself, not on a folder's name


def test_a_ckpt_folder_named_tiny_gets_no_preset_of_the_embedded_model(ckpt, tmp_path, monkeypatch):
    assert ckpt.name == "tiny"  # test_safety's checkpoint: another model that happens to be named tiny
    cfg = train.parse_config(["--ckpt", str(ckpt)])
    assert (cfg.lr, cfg.val_size, cfg.data, cfg.epochs) == (3e-4, 120, "data/commonsense_170k.json", 3)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()  # a relative folder named tiny, beside no checkpoints/tiny
    assert train.parse_config(["--ckpt", "tiny/"]).lr == 3e-4
    for embedded in ([], ["--ckpt", "tiny"], ["--ckpt", "checkpoints/tiny"], ["--ckpt", str(tmp_path / "checkpoints" / "tiny")]):
        cfg = train.parse_config(embedded)
        assert (cfg.lr, cfg.val_size, cfg.epochs) == (2e-3, 40, 2) and cfg.data == train.PRESETS["tiny"]["data"]


# D07: a tokenizer that loses text is refused where it is read (a round trip of every kind of character)


def byte_level_tokenizer(folder, pre_tokenizer, eos="</s>"):
    """A tokenizer.json of GPT-2's 256 byte tokens and no merges (the smallest byte-level BPE)
    with `pre_tokenizer`, and its tokenizer_config.json naming `eos`."""
    from data.tokenizer import byte_level_alphabet

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {char: byte for char, byte in byte_level_alphabet().items()}
    spec = {"normalizer": None, "pre_tokenizer": pre_tokenizer, "post_processor": None,
            "added_tokens": [{"id": 256, "content": "</s>", "special": True}],
            "model": {"type": "BPE", "vocab": vocab, "merges": []}}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}))
    return folder / "tokenizer.json"


def split_then_byte_level(regex):
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


def test_a_tokenizer_json_whose_split_regex_covers_some_text_is_refused(tmp_path):
    good = Tokenizer(byte_level_tokenizer(tmp_path / "good", split_then_byte_level(r"\s+|\S+")))
    assert good.decode(good.encode("The answer is 42, true.")) == "The answer is 42, true."
    for n, regex in enumerate([r"\p{L}+",  # D07: "The answer is 42, true." -> "Theansweristrue"
                               r"\p{L}+|\p{N}+|\s+",  # no punctuation
                               r"[A-Za-z0-9 ,.]+|\n",  # ASCII letters only: "café" loses its é
                               r"[ -~]+",  # printable ASCII, no newline
                               r"\S+| ",  # single spaces: the 16-space indent is kept... but not "\n"
                               r"[^\d]+"]):  # no digits
        path = byte_level_tokenizer(tmp_path / str(n), split_then_byte_level(regex))
        with pytest.raises(ValueError, match=r"tokenizer\.json: text does not survive encoding and decoding") as e:
            Tokenizer(path)
        assert "\n" not in str(e.value)


def test_a_model_whose_tokenizer_loses_text_is_one_line_in_train_and_eval(ckpt, records, tmp_path, capsys):
    folder = tmp_path / "ckpt"
    shutil.copytree(ckpt, folder)
    (folder / "tokenizer.model").unlink()
    byte_level_tokenizer(folder, split_then_byte_level(r"\p{L}+"))
    params = read_json(folder / "params.json")
    (folder / "params.json").write_text(json.dumps({**params, "vocab_size": 257}))
    assert "text does not survive encoding" in refused_by_train(train_args(folder, records, tmp_path / "run"))
    assert evaluator.main(eval_args(folder, tmp_path / "eval")) == 1
    assert "tokenizer.json: text does not survive encoding" in one_line(capsys)


# G06: the adapter's settings are recorded under the tensor file's checksum; an edited config is refused


@pytest.mark.parametrize("edit, key", [
    (lambda c: c | {"alpha": 2 * c["alpha"]}, "alpha"),  # G06: tensors untouched, the merged weights change
    (lambda c: c | {"alpha": c["alpha"] + 1e-6}, "alpha"),
    (lambda c: c | {"dropout": 0.5}, "dropout"),
    (lambda c: c | {"layers": [0]}, "layers"),  # a block's adapters dropped: the rest loads, silently less
    (lambda c: c | {"base_model": {**c["base_model"], "fingerprint": "0" * 16}}, "base_model"),
    (lambda c: c | {"targets": c["targets"][::-1]}, "targets"),
])
def test_an_adapter_config_edited_after_the_save_is_refused(tmp_path, edit, key):
    model = echo_lora.add_adapters(small_model(), r=2, alpha=4, targets=("wq", "wv"))
    echo_lora.save_adapter(tmp_path, model)
    config = read_json(tmp_path / "adapter_config.json")
    (tmp_path / "adapter_config.json").write_text(json.dumps(edit(config)))
    with pytest.raises(ValueError, match=rf"adapter_config\.json: '{key}' is .*, but adapter\.safetensors was saved "
                                         r"with .*: the config was edited after the save") as e:
        echo_lora.load_adapter(tmp_path, small_model())
    assert "\n" not in str(e.value)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))  # as saved: loads
    echo_lora.load_adapter(tmp_path, small_model())


def test_eval_refuses_an_adapter_whose_alpha_was_edited(ckpt, tmp_path, capsys):
    model, _ = llama.load(ckpt, dtype=torch.float32)
    echo_lora.save_adapter(tmp_path / "adapter", echo_lora.add_adapters(model, r=2, alpha=4))
    config = read_json(tmp_path / "adapter" / "adapter_config.json")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "alpha": 64}))
    assert evaluator.main(eval_args(ckpt, tmp_path / "eval", "--adapter", str(tmp_path / "adapter"))) == 1
    assert "'alpha' is 64, but adapter.safetensors was saved with 4" in one_line(capsys)
    assert not (tmp_path / "eval" / "results.json").exists()


# ---- class 1: every file the project reads has its shape checked once, where it is read


def rewrite_json(path, edit):
    path.write_text(json.dumps(edit(read_json(path))))


@pytest.mark.parametrize("edit, message", [
    (lambda c: c | {"layers": ["0"]}, r"'layers/0' is \"0\", expected int"),  # the examples
    (lambda c: c | {"r": 2**62}, r"rank r 4611686018427387904 is above the model's width 32"),
    (lambda c: c | {"r": 0}, r"'r' is 0, expected an integer >= 1"),
    (lambda c: c | {"alpha": -4}, r"'alpha' is -4, expected a number > 0"),
    (lambda c: c | {"dropout": 1.5}, r"'dropout' is 1.5, expected a number in \[0, 1\)"),
    (lambda c: c | {"targets": []}, r"'targets' is \[\], expected a non-empty list of names"),
    (lambda c: c | {"layers": [-1]}, r"'layers/0' is -1, expected a block index >= 0"),
    (lambda c: {k: v for k, v in c.items() if k != "dora"}, r"has no 'dora'"),
    (lambda c: [c], r"holds \[.*, expected an object"),
    (lambda c: c | {"base_model": {"shape": "32x1"}}, r"'base_model/shape' is \"32x1\", expected an object"),
])
def test_an_adapter_config_of_the_wrong_shape_is_one_line(tmp_path, edit, message):
    echo_lora.save_adapter(tmp_path, echo_lora.add_adapters(small_model(), r=2, alpha=4))
    rewrite_json(tmp_path / "adapter_config.json", edit)
    with pytest.raises(ValueError, match=r"adapter_config\.json: " + message) as e:
        echo_lora.load_adapter(tmp_path, small_model())
    assert "\n" not in str(e.value)


def test_eval_with_an_adapter_config_of_the_wrong_shape_is_one_line(ckpt, tmp_path, capsys):
    model, _ = llama.load(ckpt, dtype=torch.float32)
    echo_lora.save_adapter(tmp_path / "adapter", echo_lora.add_adapters(model, r=2, alpha=4))
    rewrite_json(tmp_path / "adapter" / "adapter_config.json", lambda c: c | {"layers": ["0"]})
    assert evaluator.main(eval_args(ckpt, tmp_path / "eval", "--adapter", str(tmp_path / "adapter"))) == 1
    assert "adapter_config.json: 'layers/0' is \"0\", expected int" in one_line(capsys)


@pytest.mark.parametrize("index, message", [
    ([], r"holds \[\], expected an object"),  # the example
    ({}, r"has no 'weight_map'"),
    ({"weight_map": []}, r"'weight_map' is \[\], expected an object"),
    ({"weight_map": {"model.norm.weight": 3}}, r"'weight_map/model\.norm\.weight' is 3, expected str"),
    ("model.safetensors", r"holds \"model\.safetensors\", expected an object"),
])
def test_a_safetensors_index_of_the_wrong_shape_is_one_line(tmp_path, index, message):
    folder = write_hf_folder(small_model(), tmp_path / "hf")
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SystemExit, match=r"convert_hf\.py: .*model\.safetensors\.index\.json: " + message) as e:
        convert_hf.main([str(folder), str(tmp_path / "meta")])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("edit, message", [
    (lambda c: {k: v for k, v in c.items() if k != "hidden_size"}, r"has no 'hidden_size'"),  # a KeyError before
    (lambda c: c | {"architectures": "LlamaForCausalLM"}, r"'architectures' is \"LlamaForCausalLM\", expected"),
    (lambda c: c | {"rope_parameters": {"rope_theta": "10000", "rope_type": "default"}},
     r"'rope_parameters/rope_theta' is \"10000\", expected float"),
    (lambda c: c | {"rope_scaling": "llama3"}, r"'rope_scaling' is \"llama3\", expected"),
    (lambda c: [c], r"holds \[.*, expected an object"),
    (lambda c: c | {"num_hidden_layers": 1.0}, r"'num_hidden_layers' is 1.0, expected int"),
])
def test_an_hf_config_of_the_wrong_shape_is_one_line(tmp_path, edit, message):
    folder = write_hf_folder(small_model(), tmp_path / "hf")
    rewrite_json(folder / "config.json", edit)
    with pytest.raises(ValueError, match=r"config\.json: " + message) as e:
        convert_hf.read_hf_config(folder / "config.json")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name, content, message", [
    ("tokenizer_config.json", {"eos_token": ["</s>"]}, r"'eos_token' is \[\"</s>\"\], expected"),  # the issue's
    ("tokenizer_config.json", {"eos_token": {"text": "</s>"}}, r"'eos_token' has no 'content'"),
    ("tokenizer_config.json", {"eos_token": "</s>", "add_bos_token": "yes"}, r"'add_bos_token' is \"yes\""),
    ("tokenizer_config.json", ["</s>"], r"holds \[\"</s>\"\], expected an object"),
    ("config.json", {"eos_token_id": []}, r"'eos_token_id' is \[\], expected"),  # ids[0]: an IndexError before
    ("config.json", {"eos_token_id": "2"}, r"'eos_token_id' is \"2\", expected"),
    ("config.json", {"pad_token_id": -5}, r"'pad_token_id' is -5, expected"),
    ("config.json", {"eos_token_id": [0, 10 ** 6]}, r"token ids \[1000000\] are outside the vocabulary of \d+ ids"),
    ("config.json", {"pad_token_id": 10 ** 6}, r"token ids \[1000000\] are outside the vocabulary"),
    ("tokenizer.json", [], r"holds \[\], expected an object"),
])
def test_tokenizer_files_of_the_wrong_shape_are_one_line(tmp_path, name, content, message):
    path = byte_level_tokenizer(tmp_path, split_then_byte_level(r"\s+|\S+"))
    (tmp_path / name).write_text(json.dumps(content))
    with pytest.raises(ValueError, match=rf"{name}: " + message) as e:
        Tokenizer(path)
    assert "\n" not in str(e.value)


def metrics_run(tmp_path, metrics_text):
    from test_experiment import write_run

    run = write_run(tmp_path / "echo-lora-s1", "echo-lora", 1, {"ARC-Easy": [True, False]})
    (run / "metrics.jsonl").write_text(metrics_text)
    return run


@pytest.mark.parametrize("text, message", [
    ('{"step": "2", "loss": 1.0}\n', r"line 1: 'step' is \"2\", expected int"),  # the example
    ('{"step": -1}\n', r"line 1: 'step' is -1, expected a step >= 0"),
    ('{"step": 1, "echo_diag_gate": "0.5"}\n', r"line 1: 'echo_diag_gate' is \"0.5\", expected float"),
    ('[1, 2]\n{"step": 1}\n', r"line 1: holds \[1, 2\], expected an object"),
    ('{"loss": 1.0}\n{"step": 1}\n', r"line 1: has no 'step'"),
    ('{"step": 1, "loss": NaN}\n{"step": 2}\n', r"line 1 is not a metrics entry"),
])
def test_a_metrics_file_of_the_wrong_shape_is_one_line_in_the_table(tmp_path, text, message):
    run = metrics_run(tmp_path, text)
    with pytest.raises(SystemExit, match=r"experiment\.py: .*metrics\.jsonl: " + message) as e:
        experiment.main(["--table-only", "--out", str(tmp_path), "--runs", str(run)])
    assert "\n" not in str(e.value)


def test_a_metrics_file_of_the_wrong_shape_is_one_line_on_resume(finished_run, ckpt, records, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "metrics.jsonl").write_text('{"step": "0", "val_loss": 1.0}\n{"step": 1}\n')
    message = refused_by_train(train_args(ckpt, records, run, "--resume", "--max-steps", "3"))
    assert "metrics.jsonl: line 1: 'step' is \"0\", expected int" in message


@pytest.mark.parametrize("file, edit, message", [
    ("results.json", lambda r: r | {"args": {**r["args"], "num_beams": "1"}}, r"'args/num_beams' is \"1\", expected int"),
    ("results.json", lambda r: [r], r"holds \[.*expected an object"),
    ("results.json", lambda r: r | {"test_sha256": ["abc"]}, r"'test_sha256' is \[\"abc\"\], expected an object"),
    ("config.json", lambda c: c | {"config": {**c["config"], "seed": "1"}}, r"'config/seed' is \"1\", expected int"),
    ("config.json", lambda c: c | {"config": {**c["config"], "method": None}}, r"'config/method' is null, expected str"),
    ("config.json", lambda c: c | {"config": "lora"}, r"'config' is \"lora\", expected an object"),
])
def test_results_and_run_records_of_the_wrong_shape_are_one_line_in_the_table(tmp_path, file, edit, message):
    run = metrics_run(tmp_path, "")
    rewrite_json(run / file, edit)
    with pytest.raises(SystemExit, match=rf"experiment\.py: .*{file}: " + message) as e:
        experiment.main(["--table-only", "--out", str(tmp_path), "--runs", str(run)])
    assert "\n" not in str(e.value)


# ---- class 2: the results table trusts nothing it can recompute


def scored_run(tmp_path, name="echo-lora-s1", arm="echo-lora", **kw):
    from test_experiment import write_run

    return write_run(tmp_path / name, arm, 1, {"ARC-Easy": [True, False], "ARC-Challenge": [False, True]}, **kw)


def edit_predictions(run, edit):
    """Rewrite the run's predictions and reseal results.json with their SHA-256, as a forger would."""
    lines = [json.dumps(edit(json.loads(line))) + "\n" for line in (run / "predictions.jsonl").read_text().splitlines()]
    (run / "predictions.jsonl").write_text("".join(lines))
    digest = hashlib.sha256("".join(lines).encode()).hexdigest()
    rewrite_json(run / "results.json", lambda r: r | {"predictions_sha256": digest})


@pytest.mark.parametrize("edit, message", [
    (lambda p: p | {"answer": "answer9", "correct": True}, r"'correct' is true but the answer is 'answer9'"),  # the issue's
    (lambda p: p | {"correct": not p["correct"]}, r"'correct' is (true|false) but the answer"),
    (lambda p: p | {"gold": "answer9", "answer": "answer9"}, r"gold 'answer9' is no label of ARC-"),
    (lambda p: p | {"index": str(p["index"])}, r"'index' is \"0\", expected int"),
    (lambda p: p | {"dataset": "mmlu"}, r"'dataset' is \"mmlu\", expected a benchmark"),
    (lambda p: {k: v for k, v in p.items() if k != "gold"}, r"has no 'gold'"),
    (lambda p: p | {"correct": 1}, r"'correct' is 1, expected bool"),
])
def test_the_table_recomputes_correctness_from_answer_and_gold(tmp_path, edit, message):
    run = scored_run(tmp_path)
    edit_predictions(run, edit)
    with pytest.raises(SystemExit, match=r"experiment\.py: .*predictions\.jsonl: line 1: " + message) as e:
        experiment.main(["--table-only", "--out", str(tmp_path), "--runs", str(run)])
    assert "\n" not in str(e.value)


def test_runs_scored_on_different_test_files_are_not_paired(tmp_path):
    lora, echo = scored_run(tmp_path, "lora-s1", "lora"), scored_run(tmp_path)
    for run, digest in ((lora, "a" * 64), (echo, "b" * 64)):  # two boolq/test.json files of one name
        rewrite_json(run / "results.json", lambda r: r | {"test_sha256": {"ARC-Easy": digest, "ARC-Challenge": "c" * 64}})
    with pytest.raises(SystemExit, match=r"the runs scored different ARC-Easy test files: aaaaaaaaaaaa .*lora-s1.*"
                                         r"bbbbbbbbbbbb .*echo-lora-s1") as e:
        experiment.main(["--table-only", "--out", str(tmp_path), "--runs", str(lora), str(echo)])
    assert "\n" not in str(e.value)
    rewrite_json(echo / "results.json", lambda r: r | {"test_sha256": {"ARC-Easy": "a" * 64, "ARC-Challenge": "c" * 64}})
    table = experiment.main(["--table-only", "--out", str(tmp_path), "--runs", str(lora), str(echo)])
    assert "| echo-lora vs lora | 1 |" in table


def test_a_run_whose_predictions_are_missing_is_an_error_not_a_seed_fewer(tmp_path, capsys):
    lora, echo = scored_run(tmp_path, "lora-s1", "lora"), scored_run(tmp_path)
    (echo / "predictions.jsonl").unlink()
    for call in (lambda: experiment.main(["--table-only", "--out", str(tmp_path), "--runs", str(lora), str(echo)]),
                 lambda: experiment.main(["--table-only", "--out", str(tmp_path), "--scoring", "generate"])):
        with pytest.raises(SystemExit, match=r"echo-lora-s1: results\.json but no predictions\.jsonl") as e:
            call()
        assert "\n" not in str(e.value)


def test_eval_records_the_test_files_and_the_adapter_it_scored(ckpt, tmp_path):
    model, _ = llama.load(ckpt, dtype=torch.float32)
    echo_lora.save_adapter(tmp_path / "adapter", echo_lora.add_adapters(model, r=2, alpha=4))
    assert evaluator.main(eval_args(ckpt, tmp_path / "eval", "--adapter", str(tmp_path / "adapter"))) == 0
    summary = read_json(tmp_path / "eval" / "results.json")
    assert summary["test_sha256"] == {"piqa": hashlib.sha256((DATA / "piqa" / "test.json").read_bytes()).hexdigest()}
    assert summary["adapter_sha256"] == read_json(tmp_path / "adapter" / "adapter_config.json")["tensors_sha256"]


# ---- class 3: a result names the adapter it scored, and a run folder has one writer


def test_the_table_refuses_a_result_whose_adapter_changed_since(tmp_path):
    run = scored_run(tmp_path)
    echo_lora.save_adapter(run, echo_lora.add_adapters(small_model(), r=2, alpha=4))
    scored = read_json(run / "adapter_config.json")["tensors_sha256"]
    rewrite_json(run / "results.json", lambda r: r | {"adapter_sha256": scored})
    experiment.main(["--table-only", "--out", str(tmp_path), "--runs", str(run)])  # the adapter scored is the one there
    echo_lora.save_adapter(run, echo_lora.add_adapters(small_model(seed=1), r=2, alpha=4))  # trained again since
    with pytest.raises(SystemExit, match=rf"results\.json: scored adapter {scored[:12]}, but .*adapter\.safetensors "
                                         r"is now [0-9a-f]{12}: evaluate it again") as e:
        experiment.main(["--table-only", "--out", str(tmp_path), "--runs", str(run)])
    assert "\n" not in str(e.value)
    for name in ("adapter_config.json", "adapter.safetensors"):
        (run / name).unlink(missing_ok=True)  # gone altogether
    with pytest.raises(SystemExit, match=r"adapter_config\.json: cannot read JSON"):
        experiment.main(["--table-only", "--out", str(tmp_path), "--runs", str(run)])


def test_eval_refuses_a_folder_train_is_writing(finished_run, ckpt, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    with held_by_another_process(run):
        assert evaluator.main(eval_args(ckpt, run, "--adapter", str(run))) == 1
        assert "another process is writing a run there" in one_line(capsys)
        assert not (run / "results.json").exists()
    with locked_folder(run):  # in this process too
        assert evaluator.main(eval_args(ckpt, run, "--adapter", str(run))) == 1
        assert "another process is writing a run there" in one_line(capsys)
    assert evaluator.main(eval_args(ckpt, run, "--adapter", str(run))) == 0  # nobody writing: it runs
    with locked_folder(run):  # and train.py, started while nobody holds it, takes it: eval's lock is released
        pass


@pytest.mark.parametrize("direction", ["from-peft", "to-peft"])
def test_a_conversion_into_a_folder_holding_an_adapter_needs_overwrite(finished_run, ckpt, tmp_path, capsys, direction):
    from scripts import convert_peft

    model, _ = llama.load(ckpt, dtype=torch.float32)
    echo_lora.add_adapters(model, r=2, alpha=4)
    convert_peft.export_peft(tmp_path / "peft", model)
    dest = tmp_path / "dest"
    shutil.copytree(finished_run if direction == "from-peft" else tmp_path / "peft", dest)
    source = tmp_path / "peft" if direction == "from-peft" else finished_run
    before = {f.name: f.read_bytes() for f in dest.iterdir()}
    with pytest.raises(SystemExit) as e:
        convert_peft.main([direction, str(source), str(dest), "--ckpt", str(ckpt)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert f"{dest} holds " in err and "--overwrite replaces it" in err
    assert {f.name: f.read_bytes() for f in dest.iterdir()} == before
    convert_peft.main([direction, str(source), str(dest), "--ckpt", str(ckpt), "--overwrite"])
    assert {f.name: f.read_bytes() for f in dest.iterdir()} != before


# ---- class 4: --resume continues only the same run (the same base weights)


@pytest.mark.parametrize("change", ["another seed", "norm.weight", "tok_embeddings.weight",
                                    "layers.1.feed_forward.w2.weight", "output.weight"])
def test_resume_after_the_base_weights_were_replaced_is_refused(finished_run, ckpt, records, tmp_path, change):
    """The same shapes, other values: the whole model (another seed), or the first value of one weight."""
    base = tmp_path / "tiny"
    shutil.copytree(ckpt, base)
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    rewrite_json(run / "config.json", lambda r: r | {"config": {**r["config"], "ckpt": str(base)}})
    before = {f.name: f.read_bytes() for f in run.iterdir() if f.name != ".lock"}
    if change == "another seed":
        shutil.copy(meta_ckpt(tmp_path / "other", seed=1) / "consolidated.00.pth", base / "consolidated.00.pth")
    else:
        state = torch.load(base / "consolidated.00.pth", weights_only=True)
        state[change].view(-1)[0] += 1
        torch.save(state, base / "consolidated.00.pth")
    message = refused_by_train(train_args(base, records, run, "--resume", "--max-steps", "3"))
    assert "checkpoint.pt: the run trained on other base weights" in message and "--resume continues only" in message
    assert {f.name: f.read_bytes() for f in run.iterdir() if f.name != ".lock"} == before


# ---- class 5: records checked where they are parsed, the cloze form included


def arc_record(**change):
    record = {"instruction": "Please choose the correct answer to the question: Which is largest?\n\n"
                             "Answer1: 7 Answer2: 12 Answer3: 18\n\nAnswer format: answer1/answer2/answer3",
              "input": "", "output": "the correct answer is answer3", "answer": "answer3"}
    return record | change


@pytest.mark.parametrize("record, message", [
    (arc_record(instruction="Choose: Which is largest?\n\nAnswer1: 7 Answer2:  Answer3: 18\n\nAnswer format: "
                            "answer1/answer2/answer3"), "do not match its labels"),  # an empty choice text
    (arc_record(instruction="Choose: Which is largest?\n\nAnswer format: answer1/answer2/answer3"),
     "no choices listed"),  # ARC without its choices: the label names were ranked as choices
    (arc_record(instruction="Choose: Which is largest?\n\nAnswer1: 7 Answer2: 12\n\nAnswer format: "
                            "answer1/answer2/answer3"), "do not match its labels"),  # fewer choices than labels
    (arc_record(answer="answer4"), "do not match its labels"),  # a gold label not among them
    (arc_record(instruction="Which is largest? Answer1: 7 Answer2: 12 Answer3: 18"), "no choices listed"),
    (arc_record(instruction="Q: is it?\n\nAnswer format: yes/no", answer="yes"), "no choices listed"),
])
def test_a_record_without_a_cloze_form_is_one_line_before_any_work(ckpt, tmp_path, capsys, monkeypatch, record,
                                                                    message):
    tests = tmp_path / "tests" / "ARC-Easy"
    tests.mkdir(parents=True)
    good = load_records(DATA / "ARC-Easy" / "test.json")[:3]
    (tests / "test.json").write_text(json.dumps(good + [record]))
    scored = []
    monkeypatch.setattr(evaluator, "rank_by_likelihood", lambda *a: scored.append(a) or [])
    argv = eval_args(ckpt, tmp_path / "eval", "--data-dir", str(tmp_path / "tests"), "--datasets", "ARC-Easy",
                     "--scoring", "cloze", "--limit", "4")
    assert evaluator.main(argv) == 1
    line = one_line(capsys)
    assert "test.json: record 3: " in line and message in line and not scored
    data = tmp_path / "train.json"  # and in training
    data.write_text(json.dumps(good * 4 + [record]))
    line = refused_by_train(train_args(ckpt, data, tmp_path / "run", "--cloze"))
    assert "--cloze: record 12 of --data: " in line and message in line


# ---- class 6: every question checked before the work; class 7: non-finite values anywhere stop the run


@pytest.mark.parametrize("scoring, extra", [("generate", ()), ("likelihood", ()), ("cloze", ()),
                                           ("generate", ("--num-beams", "2")), ("likelihood", ("--batch-size", "1"))])
def test_a_question_too_long_for_the_model_is_found_before_any_is_scored(tmp_path, capsys, monkeypatch, scoring,
                                                                          extra):
    folder = meta_ckpt(tmp_path / "short", max_seq_len=100)  # a 200-position rotary table
    tests = tmp_path / "tests"
    for name in ("ARC-Easy", "ARC-Challenge"):
        records = load_records(DATA / name / "test.json")[:4]
        if name == "ARC-Challenge":  # the last question of the second set is the long one
            records[3]["instruction"] = records[3]["instruction"].replace("\n\n", " word" * 200 + "\n\n", 1)
        (tests / name).mkdir(parents=True)
        (tests / name / "test.json").write_text(json.dumps(records))
    work = []
    monkeypatch.setattr(evaluator, "evaluate", lambda *a: work.append(a) or [])
    monkeypatch.setattr(evaluator, "rank_by_likelihood", lambda *a: work.append(a) or [])
    argv = eval_args(folder, tmp_path / "eval", "--data-dir", str(tests), "--datasets", "ARC-Easy", "ARC-Challenge",
                     "--scoring", scoring, "--limit", "4", *extra)
    assert evaluator.main(argv) == 1
    assert "ARC-Challenge item 3: " in one_line(capsys) and not work
    assert not (tmp_path / "eval" / "results.json").exists()


def test_a_max_new_tokens_past_the_model_is_found_before_any_is_scored(tmp_path, capsys, monkeypatch):
    folder = meta_ckpt(tmp_path / "short", max_seq_len=100)  # 200 positions: each ARC prompt fits, + 150 does not
    work = []
    monkeypatch.setattr(evaluator, "evaluate", lambda *a: work.append(a) or [])
    argv = eval_args(folder, tmp_path / "eval", "--datasets", "ARC-Easy", "--limit", "3", "--max-new-tokens", "150")
    assert evaluator.main(argv) == 1
    assert "ARC-Easy item 0: prompt + --max-new-tokens 150 is" in one_line(capsys) and not work


@pytest.mark.parametrize("scoring, value, extra", [
    ("generate", "nan", ()), ("likelihood", "nan", ()), ("cloze", "nan", ()),
    ("generate", "inf", ("--num-beams", "2")), ("likelihood", "inf", ()), ("generate", "nan", ("--num-beams", "2"))])
def test_a_nan_first_seen_at_a_later_question_stops_eval(ckpt, tmp_path, capsys, monkeypatch, scoring, value, extra):
    original = llama.Transformer.hidden_states
    calls = []

    def nan_from_the_third_call(self, tokens, *a, **kw):  # the first question (check_logits') is finite
        hidden, states = original(self, tokens, *a, **kw)
        calls.append(1)
        return (hidden * float(value) if len(calls) >= 3 else hidden), states

    monkeypatch.setattr(llama.Transformer, "hidden_states", nan_from_the_third_call)
    # 8 questions: ranking packs 4 into one forward, so its third call is the second row's
    argv = eval_args(ckpt, tmp_path / "eval", "--datasets", "ARC-Easy", "--limit", "8", "--batch-size", "1",
                     "--scoring", scoring, *extra)
    assert evaluator.main(argv) == 1
    err = capsys.readouterr().err  # beside tqdm's progress bar
    [line] = [line for line in err.splitlines() if line.startswith("eval.py:")]
    assert "ARC-Easy item" in line and "not finite" in line and "nothing written" in line and "Traceback" not in err
    assert not (tmp_path / "eval" / "results.json").exists()


@pytest.mark.parametrize("extra", [("--num-beams", "1"), ("--num-beams", "2")])
def test_a_nan_first_seen_at_a_later_generated_token_stops_eval(ckpt, tmp_path, capsys, monkeypatch, extra):
    """Prompts finite, the third decoding step NaN: greedy and beam search stop there, nothing written."""
    original = llama.Transformer.hidden_states
    steps = []

    def nan_at_the_third_decoding_step(self, tokens, *a, **kw):
        hidden, states = original(self, tokens, *a, **kw)
        steps.append(tokens.shape[1] == 1)
        return (hidden * float("nan") if sum(steps) == 3 and steps[-1] else hidden), states

    monkeypatch.setattr(llama.Transformer, "hidden_states", nan_at_the_third_decoding_step)
    argv = eval_args(ckpt, tmp_path / "eval", "--datasets", "ARC-Easy", "--limit", "2", "--max-new-tokens", "8", *extra)
    assert evaluator.main(argv) == 1
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if line.startswith("eval.py:")]
    assert "not finite" in line and "nothing written" in line and "Traceback" not in err
    assert not (tmp_path / "eval" / "results.json").exists()


# ---- class 8: converters read like loaders: a weight comes only from the file the index names for it


@pytest.mark.parametrize("stale_in", ["a-00001.safetensors", "b-00002.safetensors", "both"])
def test_convert_hf_takes_each_weight_from_the_shard_the_index_names(tmp_path, stale_in):
    real, stale = small_model(0), small_model(1)
    folder = write_hf_folder(real, tmp_path / "hf")
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    first, second = names[: len(names) // 2], names[len(names) // 2:]
    stale_tensors = load_file(str(write_hf_folder(stale, tmp_path / "stale") / "model.safetensors"))
    # a shard holds its own weights and a stale copy of one of the other shard's
    extra_a = {second[0]: stale_tensors[second[0]]} if stale_in in ("a-00001.safetensors", "both") else {}
    extra_b = {first[-1]: stale_tensors[first[-1]]} if stale_in in ("b-00002.safetensors", "both") else {}
    save_file({**{k: tensors[k] for k in first}, **extra_a}, str(folder / "a-00001.safetensors"))
    save_file({**{k: tensors[k] for k in second}, **extra_b}, str(folder / "b-00002.safetensors"))
    index = {k: "a-00001.safetensors" for k in first} | {k: "b-00002.safetensors" for k in second}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    convert_hf.convert(folder, tmp_path / "meta")
    assert same_weights(llama.load(tmp_path / "meta", dtype=torch.float32)[0], real)
    # and the index naming a shard for a weight it lacks is one line
    save_file({k: tensors[k] for k in second[1:]}, str(folder / "b-00002.safetensors"))
    with pytest.raises(SystemExit, match=rf"b-00002\.safetensors: the index names it for \['{second[0]}'\]") as e:
        convert_hf.main([str(folder), str(tmp_path / "meta2")])
    assert "\n" not in str(e.value)


def shard_halves(folder, tensors, edit_index):
    """The folder's weights split into two shards a.safetensors and b.safetensors, with an index
    that `edit_index(index, names)` may spoil."""
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    save_file({k: tensors[k] for k in names[:half]}, str(folder / "a.safetensors"))
    save_file({k: tensors[k] for k in names[half:]}, str(folder / "b.safetensors"))
    index = {k: "a.safetensors" for k in names[:half]} | {k: "b.safetensors" for k in names[half:]}
    edit_index(index, names)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))


def retyped(key, change):
    def edit(folder, tensors):
        tensors[key] = change(tensors[key])
        save_file(tensors, str(folder / "model.safetensors"))
    return edit


Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


@pytest.mark.parametrize("spoil, message", [
    (lambda f, t: shard_halves(f, t, lambda i, n: i.__setitem__(n[0], "../x.safetensors")),
     r"index\.json: '\.\./x\.safetensors' is not a name inside"),
    (lambda f, t: shard_halves(f, t, lambda i, n: i.__setitem__(n[0], "c.safetensors")),
     r"index\.json: lists \['c\.safetensors'\] but they are not in the folder"),
    (lambda f, t: shard_halves(f, t, lambda i, n: i.pop("lm_head.weight")), r"missing weights \['output\.weight'\]"),
    (retyped(Q_PROJ, lambda w: w[:, :-1].contiguous()), r"wq\.weight has shape \(32, 31\), the config says \(32, 32\)"),
    (retyped(Q_PROJ, lambda w: w.to(torch.int32)), r"q_proj\.weight is int32; weights are floating point"),
    (lambda f, t: save_file(t | {"model.layers.0.self_attn.q_proj.bias": torch.zeros(32)}, str(f / "model.safetensors")),
     r"unexpected HF LLaMA weight 'model\.layers\.0\.self_attn\.q_proj\.bias'"),
], ids=["shard-outside", "shard-missing", "weight-unnamed", "wrong-shape", "integer-weight", "bias"])
def test_convert_hf_refuses_a_spoiled_folder_in_one_line_and_writes_nothing(tmp_path, spoil, message):
    folder = write_hf_folder(small_model(0), tmp_path / "hf")
    spoil(folder, load_file(str(folder / "model.safetensors")))
    with pytest.raises(SystemExit, match=message) as e:
        convert_hf.main([str(folder), str(tmp_path / "meta")])
    assert "\n" not in str(e.value) and not (tmp_path / "meta").exists()


# ---- class 9: Ctrl-C and a full disk are one line


def test_ctrl_c_during_training_is_one_line_saying_the_checkpoint_is_intact(ckpt, records, tmp_path, capsys,
                                                                           monkeypatch):
    out, original = tmp_path / "run", train.save_checkpoint

    def interrupted(path, step, *a):  # Ctrl-C just after the first checkpoint
        original(path, step, *a)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", interrupted)
    with pytest.raises(SystemExit) as e:
        train.cli(train_args(ckpt, records, out, "--max-steps", "3"))  # what `python train.py` runs
    err = capsys.readouterr().err
    assert e.value.code == 130 and "Traceback" not in err
    [line] = [line for line in err.splitlines() if "train.py:" in line]  # after the progress bar
    assert line.endswith(f"train.py: interrupted; {out}/checkpoint.pt is intact; --resume continues from it")
    monkeypatch.setattr(train, "save_checkpoint", original)
    train.main(train_args(ckpt, records, out, "--max-steps", "3", "--resume"))  # and it does
    with pytest.raises(SystemExit) as e:  # before any checkpoint: said so
        monkeypatch.setattr(train, "run", lambda cfg: (_ for _ in ()).throw(KeyboardInterrupt()))
        train.cli(train_args(ckpt, records, tmp_path / "other"))
    assert e.value.code == 130 and "train.py: interrupted; no checkpoint was saved yet" in capsys.readouterr().err


@pytest.mark.parametrize("failing", ["torch.save", "open"])
def test_a_full_disk_while_saving_is_one_line(ckpt, records, tmp_path, monkeypatch, failing):
    """While saving the checkpoint (torch.save's RuntimeError) or the best adapter (an OSError)."""
    def full(*a, **kw):
        if failing == "torch.save":
            raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file "
                               "data/3: file write failed\nmore")
        raise OSError(28, "No space left on device")

    if failing == "torch.save":
        monkeypatch.setattr(torch, "save", full)
    else:
        monkeypatch.setattr(train, "save_adapter", full)  # the best adapter, after the first validation
    message = refused_by_train(train_args(ckpt, records, tmp_path / "run"))
    assert ("checkpoint.pt: cannot write: [enforce fail" in message if failing == "torch.save"
            else "No space left on device" in message)


@pytest.mark.parametrize("file", ["config.json", "metrics.jsonl", "adapter.safetensors", "adapter_config.json"])
def test_a_full_disk_while_writing_any_run_file_is_one_line_naming_it(ckpt, records, tmp_path, monkeypatch, file):
    from pathlib import Path

    write_text, write_bytes, opened = Path.write_text, Path.write_bytes, Path.open

    def full(method):
        def write(self, *a, **kw):
            if self.name.startswith(f".{file}.") or self.name == file and method is opened and "a" in str(a[:1]):
                raise OSError(28, "No space left on device", str(self))
            return method(self, *a, **kw)
        return write

    monkeypatch.setattr(Path, "write_text", full(write_text))
    monkeypatch.setattr(Path, "write_bytes", full(write_bytes))
    monkeypatch.setattr(Path, "open", full(opened))
    message = refused_by_train(train_args(ckpt, records, tmp_path / "run"))
    assert "No space left on device" in message and file in message
