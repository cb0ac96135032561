"""The embedded default: a tiny random LLaMA and a tokenizer trained on our sample records,
written as an ordinary Meta-layout checkpoint, so `python train.py` runs with nothing downloaded
and eval.py and everything else load it like a real one.
"""

import dataclasses
import io
import json
from pathlib import Path

import torch

import llama
from data.commonsense import load_records, train_prompt
from data.files import write_atomically


def build_embedded_checkpoint(folder: Path, sample: Path):
    import sentencepiece

    texts = [train_prompt(r) for r in load_records(sample)]
    model_file = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model_file, vocab_size=800, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        # As LLaMA's own SentencePiece model: whitespace kept as it is (identity normalisation,
        # whitespace-only pieces), so the prompt's 16-space indent is one piece, the answer-only
        # labels start exactly at the output, and the evaluation prompt ends as training saw it.
        remove_extra_whitespaces=False, normalization_rule_name="identity", allow_whitespace_only_pieces=True,
        split_digits=True,
    )
    args = llama.ModelArgs(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=800, multiple_of=32,
                           max_seq_len=512)
    torch.manual_seed(0)
    model = llama.Transformer(args)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(folder / "tokenizer.model", lambda tmp: tmp.write_bytes(model_file.getvalue()))
    write_atomically(folder / "consolidated.00.pth", lambda tmp: torch.save(model.state_dict(), tmp))
    params = {k: v for k, v in dataclasses.asdict(args).items() if k != "ffn_hidden_dim"}
    write_atomically(folder / "params.json", lambda tmp: tmp.write_text(json.dumps(params, indent=2)))
