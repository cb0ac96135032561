"""train.py end to end on CPU: real records with the real LLaMA-2 tokenizer, the embedded
default, resume against an uninterrupted run, and two data-parallel processes against one."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import llama
import train
from conftest import ASSETS, ROOT
from data import batches
from data.commonsense import IGNORE_INDEX, load_records
from reference import write_meta_folder

ARC_TRAIN = ASSETS / "data" / "commonsense" / "ARC-Easy" / "train.json"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny random LLaMA with the real LLaMA-2 tokenizer, as a Meta checkpoint folder."""
    folder = tmp_path_factory.mktemp("ckpt") / "tiny-llama2"
    torch.manual_seed(0)
    write_meta_folder(llama.Transformer(llama.ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2,
                                                        vocab_size=32000, multiple_of=32)), folder)
    shutil.copy(ASSETS / "models" / "llama2-tokenizer" / "tokenizer.model", folder)
    return folder


@pytest.fixture(scope="module")
def arc_records(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "arc.json"
    path.write_text(json.dumps(load_records(ARC_TRAIN)[:160]))
    return path


def run(tmp_path, ckpt, data, *extra):
    out = tmp_path / "out"
    train.main(["--ckpt", str(ckpt), "--data", str(data), "--out", str(out), "--device", "cpu", "--batch-size", "8",
                "--micro-batch-size", "4", "--warmup-steps", "2", "--val-size", "16", "--cutoff", "160", *extra])
    return out, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_collate_shifts_answer_labels_and_train_on_inputs():
    examples = [([1, 5, 6, 7, 8, 2], [IGNORE_INDEX] * 3 + [7, 8, 2]), ([1, 9, 10, 2], [IGNORE_INDEX] * 2 + [10, 2])]
    batch = batches.collate(examples, train_on_inputs=False, pad_id=0)
    assert batch.answer_targets.tolist() == [[-100, -100, 7, 8, 2, -100], [-100, 10, 2, -100, -100, -100]]
    assert torch.equal(batch.ce_targets, batch.answer_targets)
    batch = batches.collate(examples, train_on_inputs=True, pad_id=0)
    assert batch.ce_targets.tolist() == [[5, 6, 7, 8, 2, -100], [9, 10, 2, -100, -100, -100]]


@pytest.mark.parametrize("method", ["echo-lora", "echo-dora"])
def test_real_records_validation_loss_goes_down(tmp_path, tiny_ckpt, arc_records, method):
    out, metrics = run(tmp_path, tiny_ckpt, arc_records, "--method", method, "--max-steps", "16",
                       "--eval-every", "8", "--lr", "5e-3", "--answer-only-loss")  # the answer: learnt in 16 steps
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert len(val) == 3 and val[-1] < 0.7 * val[0], val  # steps 0, 8 and 16
    steps = [m for m in metrics if "loss" in m]
    assert len(steps) == 16 and all(m["loss"] == m["loss"] for m in steps) and sum(m["routed"] for m in steps) > 0
    saved = load_file(str(out / "adapter.safetensors"))
    assert not any("echo" in k or "proj" in k or "gate" in k for k in saved)
    record = json.loads((out / "config.json").read_text())
    assert record["config"]["method"] == method and record["echo_parameters"] > 0
    assert record["device"].startswith("cpu: ") and " cores, " in record["device"]  # the machine the run was made on
    assert len(record["code"]["git_commit"] or "0" * 40) == 40
    # the Echo path's diagnostics, on every step that routed a sample
    diagnosed = [m for m in steps if m["routed"]]
    keys = {"echo_diag_ce_echo", "echo_diag_ce_plain", "echo_diag_kl", "echo_diag_gate", "echo_diag_injection_rel"}
    assert all(keys <= set(m) and all(math.isfinite(m[k]) for k in keys) for m in diagnosed)
    # KL >= 0 exactly; at step 1 the two passes give nearly one distribution, and the fp32 sum of
    # its terms can round below 0 (-2.0e-7 measured on an AVX2 CPU)
    assert all(0 < m["echo_diag_gate"] < 1 and m["echo_diag_kl"] >= -1e-6 for m in diagnosed)


def test_resumed_run_continues_the_same_loss_curve(tmp_path, tiny_ckpt, arc_records, monkeypatch):
    common = ("--method", "echo-lora", "--max-steps", "8", "--save-every", "4", "--eval-every", "4")
    _, uninterrupted = run(tmp_path / "a", tiny_ckpt, arc_records, *common)

    original = train.save_checkpoint

    def crash_after_first_checkpoint(path, step, *args):
        original(path, step, *args)
        raise KeyboardInterrupt(f"simulated crash at step {step}")

    monkeypatch.setattr(train, "save_checkpoint", crash_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", tiny_ckpt, arc_records, *common)
    monkeypatch.setattr(train, "save_checkpoint", original)
    _, resumed = run(tmp_path / "b", tiny_ckpt, arc_records, *common, "--resume")
    strip = lambda ms: [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in ms]  # noqa: E731
    assert strip(resumed) == strip(uninterrupted)


def test_two_data_parallel_processes_equal_one(tmp_path, tiny_ckpt, arc_records):
    args = ["--ckpt", str(tiny_ckpt), "--data", str(arc_records), "--device", "cpu", "--method", "echo-lora",
            "--batch-size", "8", "--micro-batch-size", "2", "--max-steps", "3", "--val-size", "0",
            "--dropout", "0", "--warmup-steps", "1", "--cutoff", "160"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, launcher in (("one", [sys.executable, "train.py"]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                    "--master_port", "29533", "train.py"])):
        subprocess.run(launcher + args + ["--out", str(tmp_path / name)], cwd=ROOT, env=env, check=True,
                       capture_output=True, timeout=300)
    one, two = (load_file(str(tmp_path / n / "adapter.safetensors")) for n in ("one", "two"))
    assert one.keys() == two.keys()
    diff = max((one[k] - two[k]).abs().max().item() for k in one)
    assert diff < 1e-6, diff
    assert max(one[k].abs().max().item() for k in one if "lora_B" in k) > 0  # it really trained


def test_embedded_default_runs_from_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    train.main(["--max-steps", "3", "--eval-every", "3"])
    captured = capsys.readouterr()
    printed = captured.out
    assert "tok_s=" in captured.err
    assert (tmp_path / "checkpoints" / "tiny" / "tokenizer.model").is_file()
    assert (tmp_path / "out" / "echo-lora-tiny" / "adapter.safetensors").is_file()
    assert "python eval.py --ckpt tiny --adapter out/echo-lora-tiny" in printed
    model, tokenizer = llama.load(tmp_path / "checkpoints" / "tiny")
    assert tokenizer.n_words == model.args.vocab_size


def test_bad_input_is_one_clear_error(tmp_path, tiny_ckpt):
    with pytest.raises(SystemExit):
        train.parse_config(["--method", "qlora"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "q", "input": "", "output": "o"}]))
    with pytest.raises(SystemExit, match=r"bad.json: record 0: missing key 'answer'"):
        train.main(["--ckpt", str(tiny_ckpt), "--data", str(bad), "--out", str(tmp_path / "o"), "--device", "cpu"])
    good = ["--ckpt", str(tiny_ckpt), "--data", str(ARC_TRAIN), "--out", str(tmp_path / "o"), "--device", "cpu"]
    with pytest.raises(SystemExit, match=r"unknown adapter targets \['wz'\]"):
        train.main(good + ["--targets", "wq,wz"])
    with pytest.raises(SystemExit, match="echo layer 9 is outside the model's blocks 1..4"):
        train.main(good + ["--echo-source-layers", "3,9"])


def test_echo_lr_scale_multiplies_the_echo_paths_first_update_only(tmp_path, tiny_ckpt, arc_records, monkeypatch):
    """AdamW's first update of a parameter is -lr g / (|g| + eps): with --echo-lr-scale 10 every
    Echo parameter moves exactly 10 times as far as unscaled, and the adapters exactly as far
    (the same seed gives the same first gradients). Under --echo-up own, U is the Echo parameter
    that takes a gradient at the first step."""
    made = []

    class Recorded(train.EchoPath):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append({k: v.clone() for k, v in self.state_dict().items()})
            made.append(self)

    monkeypatch.setattr(train, "EchoPath", Recorded)
    moves, adapters = [], []
    for scale in ("1", "10"):
        out, _ = run(tmp_path / scale, tiny_ckpt, arc_records, "--method", "echo-lora", "--echo-up", "own",
                     "--echo-route-p", "1", "--max-steps", "1", "--val-size", "0", "--echo-lr-scale", scale)
        before, echo = made[-2:]
        moves.append({k: v - before[k] for k, v in echo.state_dict().items()})
        adapters.append(load_file(str(out / "adapter.safetensors")))
    unscaled, scaled = moves
    up = [k for k in unscaled if unscaled[k].abs().max() > 0]
    assert up and all(".up." in k or k.endswith("up.weight") for k in up), up
    for k in unscaled:
        torch.testing.assert_close(scaled[k], 10 * unscaled[k], rtol=1e-5, atol=1e-12)
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
