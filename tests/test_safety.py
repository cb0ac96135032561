"""Safe and loud (docs/safety.md): each hostile input, fed for real, and the
behaviour it must now meet: nothing unpickled, no finished run overwritten, no run silently
wrong, and one clear line naming the flag or file instead of a traceback."""

import json
import math
import os
import pickletools
import shutil
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save_file

import bench
import echo_lora
import eval as evaluator
import llama
import train
from conftest import ASSETS
from data import adapters
from data.commonsense import load_records
from reference import write_hf_folder, write_meta_folder
from scripts import convert_hf

DATA = ASSETS / "data" / "commonsense"
TOKENIZER = ASSETS / "models" / "llama2-tokenizer" / "tokenizer.model"
SHAPE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=32)


def meta_ckpt(folder, seed=0, **params):
    """A tiny random LLaMA (Meta layout) with the real LLaMA-2 tokenizer; `params` are written
    into params.json on top."""
    torch.manual_seed(seed)
    write_meta_folder(llama.Transformer(llama.ModelArgs(**SHAPE)), folder)
    shutil.copy(TOKENIZER, folder)
    if params:
        (folder / "params.json").write_text(json.dumps({**json.loads((folder / "params.json").read_text()), **params}))
    return folder


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return meta_ckpt(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "arc.json"
    path.write_text(json.dumps(load_records(DATA / "ARC-Easy" / "train.json")[:24]))
    return path


def train_args(ckpt, records, out, *extra):
    return ["--ckpt", str(ckpt), "--data", str(records), "--out", str(out), "--device", "cpu", "--batch-size", "4",
            "--micro-batch-size", "4", "--warmup-steps", "1", "--val-size", "4", "--cutoff", "160",
            "--max-steps", "2", "--eval-every", "1", "--save-every", "1", *extra]


@pytest.fixture(scope="module")
def finished_run(ckpt, records, tmp_path_factory):
    """A finished two-step run (every flag as train_args gives it)."""
    out = tmp_path_factory.mktemp("runs") / "finished"
    train.main(train_args(ckpt, records, out))
    return out


def run_files(folder):
    return {f.name: f.read_bytes() for f in folder.iterdir()}


def parse_error(capsys, parse, argv) -> str:
    """The `error:` line a parser prints for argv (it exits with status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    return line


# ---- nothing is ever unpickled


class RunsCode:
    """A pickle payload: unpickling it calls os.system, which creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_resume_never_unpickles_a_checkpoint_that_would_run_code(finished_run, ckpt, records, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "code-ran"
    shutil.copytree(finished_run, out)  # a run, its record included, whose checkpoint was replaced
    torch.save({"step": 1, "adapter": RunsCode(marker)}, out / "checkpoint.pt")
    with pytest.raises(SystemExit, match=r"checkpoint\.pt: not a checkpoint this run can resume from") as e:
        train.main(train_args(ckpt, records, out, "--resume"))
    assert "\n" not in str(e.value)
    assert not marker.exists()
    # The control, read without unpickling: the file's pickle really does call os.system on load.
    assert f"{os.system.__module__} system" in pickled_callables(out / "checkpoint.pt")


def pickled_callables(path) -> set[str]:
    """"module name" of every callable the pickle inside a torch.save file would import (and so
    could call) when unpickled, read off its opcodes."""
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":  # protocols 0-3: "module name" inline
            found.add(arg)
        elif op.name == "STACK_GLOBAL":  # protocol 4+: the two strings pushed before it
            found.add(" ".join(strings[-2:]))
        if isinstance(arg, str):
            strings.append(arg)
    return found


# ---- a run folder is never overwritten unless asked


def test_out_folder_holding_a_run_is_refused_and_left_as_it_was(finished_run, ckpt, records, tmp_path):
    before = run_files(finished_run)
    with pytest.raises(SystemExit, match="holds a run already; --resume continues it, --overwrite replaces it"):
        train.main(train_args(ckpt, records, finished_run, "--lr", "1e-3"))
    assert run_files(finished_run) == before
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    (copy / "results.json").write_text("{}")  # eval.py's results of the old adapter
    (copy / "notes.txt").write_text("kept")
    train.main(train_args(ckpt, records, copy, "--overwrite", "--max-steps", "1"))
    metrics = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1]  # the new run's log alone
    assert json.loads((copy / "config.json").read_text())["config"]["max_steps"] == 1
    assert not (copy / "results.json").exists() and (copy / "notes.txt").exists()  # only what the run made goes


def test_default_out_twice_gives_a_new_folder(ckpt, records, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    common = ["--ckpt", str(ckpt), "--data", str(records), "--device", "cpu", "--batch-size", "4",
              "--micro-batch-size", "4", "--val-size", "0", "--max-steps", "1", "--cutoff", "160"]
    train.main(common)
    first = (tmp_path / "out" / "echo-lora-tiny" / "adapter.safetensors").read_bytes()
    capsys.readouterr()
    train.main(common)
    assert (tmp_path / "out" / "echo-lora-tiny-2" / "adapter.safetensors").is_file()
    assert (tmp_path / "out" / "echo-lora-tiny" / "adapter.safetensors").read_bytes() == first
    assert "--adapter out/echo-lora-tiny-2" in capsys.readouterr().out


@pytest.mark.parametrize("change, named", [(["--lr", "1e-3"], "--lr"), (["--batch-size", "8"], "--batch-size"),
                                           (["--seed", "7"], "--seed"), (["--max-steps", "1"], "--max-steps")])
def test_resume_refuses_flags_that_change_the_run(finished_run, ckpt, records, change, named):
    before = run_files(finished_run)
    with pytest.raises(SystemExit, match=f"--resume with flags that change the run: {named} "):
        train.main(train_args(ckpt, records, finished_run, "--resume", *change))
    assert run_files(finished_run) == before


def test_resume_allows_logging_and_a_longer_run_and_survives_a_partial_metrics_line(finished_run, ckpt, records,
                                                                                      tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 1.2')  # a kill during the append
    train.main(train_args(ckpt, records, run, "--resume", "--max-steps", "3", "--log-every", "2", "--save-every", "5"))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    assert not list(run.glob(".*.tmp"))


# ---- NaN stops a run


def test_diverging_run_stops_at_once_and_keeps_a_finite_adapter(ckpt, records, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"^step 1: val loss nan: not finite, training stopped \(--lr 1e\+30"):
        train.main(train_args(ckpt, records, out, "--lr", "1e30", "--max-steps", "4"))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(v) for m in metrics for v in m.values())
    assert not (out / "adapter.safetensors").exists()  # step 1 never beat the untouched model's finite loss
    with pytest.raises(SystemExit, match=r"^step 2: loss nan, gradient norm nan: not finite"):
        train.main(train_args(ckpt, records, tmp_path / "no-val", "--lr", "1e30", "--max-steps", "4",
                              "--val-size", "0"))
    assert not (tmp_path / "no-val" / "adapter.safetensors").exists()


def test_an_adapter_with_nan_is_refused_by_eval(ckpt, tmp_path, capsys):
    model, _ = llama.load(ckpt, dtype=torch.float32)
    echo_lora.add_adapters(model, r=4, alpha=8)
    echo_lora.adapter_parameters(model)["layers.1.feed_forward.w2.lora_B"].data[3, 1] = math.nan
    echo_lora.save_adapter(tmp_path / "adapter", model)
    code = evaluator.main(["--ckpt", str(ckpt), "--adapter", str(tmp_path / "adapter"), "--data-dir", str(DATA),
                           "--datasets", "piqa", "--limit", "1", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert "adapter.safetensors: layers.1.feed_forward.w2.lora_B holds NaN or infinite values" in err


# ---- every numeric flag range-checked when parsed


@pytest.mark.parametrize("argv, named", [
    (["--batch-size", "0"], "--batch-size"), (["--micro-batch-size", "0"], "--micro-batch-size"),
    (["--cutoff", "0"], "--cutoff"), (["--lr", "-0.01"], "--lr"), (["--lr", "nan"], "--lr"),
    (["--eval-every", "0"], "--eval-every"), (["--grad-clip", "-1"], "--grad-clip"), (["--val-size", "-5"], "--val-size"),
    (["--epochs", "0"], "--epochs"), (["--max-steps", "-1"], "--max-steps"), (["--dropout", "1"], "--dropout"),
    (["--r", "0"], "--r"), (["--seed", "-1"], "--seed"), (["--save-every", "0"], "--save-every"),
    (["--method", "lora", "--echo-route-p", "0.7"], "--echo-route-p given with --method lora"),
    (["--echo-route-p", "1.5"], "--echo-route-p must be in [0, 1], found 1.5"),
    (["--echo-tau", "0"], "--echo-tau must be > 0"), (["--echo-distill", "-1"], "--echo-distill must be >= 0"),
    (["--echo-mask", "none"], "--echo-mask none injects at every position: it needs --echo-pass full"),
    (["--resume", "--overwrite"], "--resume"), (["--device", "gpu"], "--device gpu"),
])
def test_train_flags_out_of_range_are_one_parse_error(capsys, argv, named):
    assert named in parse_error(capsys, train.parse_config, argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_one_parse_error(capsys):
    assert "--device cuda: no CUDA GPU" in parse_error(capsys, train.parse_config, ["--device", "cuda"])
    assert "--device cuda: no CUDA GPU" in parse_error(capsys, evaluator.parse_args, ["--ckpt", "x", "--device", "cuda"])


@pytest.mark.parametrize("argv, named", [(["--steps", "0"], "--steps"), (["--batch-size", "0"], "--batch-size"),
                                         (["--seq-len", "3"], "--seq-len"), (["--route-p", "2"], "--route-p")])
def test_bench_flags_out_of_range_are_one_parse_error(capsys, argv, named):
    assert named in parse_error(capsys, bench.main, argv)


def test_bench_bad_data_is_one_parse_error(capsys, tmp_path):
    common = ["--tokenizer", str(TOKENIZER), "--no-peft", "--out", str(tmp_path / "b.json")]
    assert "missing.json: no such file" in parse_error(capsys, bench.main, common + ["--data", str(tmp_path / "missing.json")])
    (tmp_path / "bad.json").write_bytes(b'[{"instruction": "caf\xe9"}]')
    assert "bad.json: not UTF-8" in parse_error(capsys, bench.main, common + ["--data", str(tmp_path / "bad.json")])
    assert "--tokenizer" in parse_error(capsys, bench.main, ["--data", "x.json", "--tokenizer", str(tmp_path / "none")])


# ---- no answer to learn from, sequences beyond the rotary table


def test_every_answer_cut_off_is_an_error_not_a_loss_of_zero(ckpt, records, tmp_path):
    with pytest.raises(SystemExit, match="--cutoff 40 cuts off the answer of every training record"):
        train.main(train_args(ckpt, records, tmp_path / "run", "--cutoff", "40"))


def test_sequences_beyond_the_rotary_table_are_one_line(records, tmp_path, capsys):
    short = meta_ckpt(tmp_path / "short", max_seq_len=48)  # a 96-position rotary table
    with pytest.raises(SystemExit, match=r"--cutoff 160: records of \d+ tokens do not fit the 96 positions"):
        train.main(train_args(short, records, tmp_path / "run"))
    code = evaluator.main(["--ckpt", str(short), "--data-dir", str(DATA), "--datasets", "piqa", "--limit", "2",
                           "--device", "cpu", "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "piqa item 0: prompt + --max-new-tokens 32 is" in err
    assert "beyond the 96 positions" in err


# ---- HF folders (scripts/convert_hf.py)


def converted(hf_folder, dest):
    """The model llama.load reads from `hf_folder` converted into `dest`."""
    return llama.load(convert_hf.convert(hf_folder, dest, overwrite=True), dtype=torch.float32)[0]


def test_hf_folder_reads_only_the_files_it_lists(tmp_path):
    torch.manual_seed(0)
    model = llama.Transformer(llama.ModelArgs(**SHAPE))
    write_hf_folder(model, tmp_path)
    torch.manual_seed(1)  # a stray copy of other weights beside the real ones
    write_hf_folder(llama.Transformer(llama.ModelArgs(**SHAPE)), tmp_path / "other")
    shutil.move(tmp_path / "other" / "model.safetensors", tmp_path / "model_backup.safetensors")
    tokens = torch.randint(0, 32000, (1, 7))
    with torch.no_grad():
        assert torch.equal(converted(tmp_path, tmp_path / "meta")(tokens), model(tokens))
    # sharded: exactly the index's files
    state = load_file(str(tmp_path / "model.safetensors"))
    names = sorted(state)
    save_file({k: state[k] for k in names[:5]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: state[k] for k in names[5:]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "model.safetensors").rename(tmp_path / "model.safetensors.old")
    index = {"weight_map": {k: f"model-0000{1 + (i >= 5)}-of-00002.safetensors" for i, k in enumerate(names)}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with torch.no_grad():
        assert torch.equal(converted(tmp_path, tmp_path / "meta")(tokens), model(tokens))


@pytest.mark.parametrize("change, message", [
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 4096}, "model_type 'mistral'"),
    ({"sliding_window": 4096}, "sliding-window attention"),
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 64}, "model_type 'gpt2'"),
    ({"hidden_size": "64"}, "'hidden_size' is \"64\", expected int"),
])
def test_hf_config_that_is_not_llama_is_one_line(tmp_path, change, message):
    write_hf_folder(llama.Transformer(llama.ModelArgs(**SHAPE)), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=r"config\.json: .*" + message.replace("(", r"\(")) as e:
        convert_hf.convert(tmp_path, tmp_path / "meta")
    assert "\n" not in str(e.value)


def test_wrong_json_types_name_the_file_and_key(tmp_path):
    folder = meta_ckpt(tmp_path / "ckpt", dim="128")
    with pytest.raises(ValueError, match=r"params\.json: 'dim' is \"128\", expected int"):
        llama.load(folder)
    model = echo_lora.add_adapters(llama.Transformer(llama.ModelArgs(**SHAPE)), r=4, alpha=8)
    echo_lora.save_adapter(tmp_path / "adapter", model)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "r": "4"}))
    with pytest.raises(ValueError, match=r"adapter_config\.json: 'r' is \"4\", expected int"):
        echo_lora.load_adapter(tmp_path / "adapter", llama.Transformer(llama.ModelArgs(**SHAPE)))


def test_non_utf8_data_names_the_file(ckpt, tmp_path):
    bad = tmp_path / "latin1.json"
    bad.write_bytes(json.dumps(load_records(DATA / "ARC-Easy" / "train.json")[:2]).encode()[:-2] + b'\xe9"}]')
    with pytest.raises(SystemExit, match=r"latin1\.json: not UTF-8 text"):
        train.main(train_args(ckpt, bad, tmp_path / "run"))


# ---- the adapter is one unit, and knows its base


def test_a_kill_between_the_two_adapter_files_is_caught(ckpt, tmp_path, monkeypatch):
    model, _ = llama.load(ckpt, dtype=torch.float32)
    echo_lora.add_adapters(model, r=4, alpha=8)
    echo_lora.save_adapter(tmp_path, model, {"step": 1})
    echo_lora.adapter_parameters(model)["layers.0.attention.wq.lora_B"].data.fill_(0.5)  # step 2

    def killed_before_the_config(file, write):
        if file.name == adapters.CONFIG_FILE:
            raise KeyboardInterrupt("killed")
        original(file, write)

    original = adapters.write_atomically
    monkeypatch.setattr(adapters, "write_atomically", killed_before_the_config)
    with pytest.raises(KeyboardInterrupt):
        echo_lora.save_adapter(tmp_path, model, {"step": 2})
    with pytest.raises(ValueError, match=r"adapter\.safetensors: its SHA-256 is not the one .*adapter_config\.json"):
        echo_lora.load_adapter(tmp_path, llama.load(ckpt, dtype=torch.float32)[0])


def test_an_adapter_on_another_base_of_the_same_shape_is_refused(ckpt, tmp_path):
    model, _ = llama.load(ckpt, dtype=torch.float32)
    echo_lora.save_adapter(tmp_path / "adapter", echo_lora.add_adapters(model, r=4, alpha=8))
    echo_lora.load_adapter(tmp_path / "adapter", llama.load(ckpt, dtype=torch.bfloat16)[0])  # same base, other dtype
    other, _ = llama.load(meta_ckpt(tmp_path / "other", seed=1), dtype=torch.float32)
    with pytest.raises(ValueError, match=r"adapter_config\.json: the adapter was trained on other base weights"):
        echo_lora.load_adapter(tmp_path / "adapter", other)


# ---- eval: empty test sets, results never overwritten


def test_empty_test_set_is_skipped_and_results_are_not_overwritten(ckpt, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(DATA / "piqa", data / "piqa")
    (data / "boolq").mkdir()
    (data / "boolq" / "test.json").write_text("[]")
    argv = ["--ckpt", str(ckpt), "--data-dir", str(data), "--datasets", "boolq", "piqa", "--limit", "2",
            "--device", "cpu", "--out", str(tmp_path / "eval"), "--max-new-tokens", "2"]
    assert evaluator.main(argv) == 0
    summary = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert list(summary["results"]) == ["piqa"] and summary["average"] == summary["results"]["piqa"]["accuracy"]
    assert "holds no records" in summary["missing"]["boolq"]
    before = run_files(tmp_path / "eval")
    capsys.readouterr()
    assert evaluator.main(argv + ["--num-beams", "2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "results.json: an earlier evaluation's results; --overwrite" in err
    assert run_files(tmp_path / "eval") == before
    assert evaluator.main(argv + ["--num-beams", "2", "--overwrite"]) == 0
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["args"]["num_beams"] == 2
