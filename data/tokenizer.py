"""LLaMA's tokenizers, torch-free: one `Tokenizer` over the three files a LLaMA checkpoint ships.

    LLaMA 1/2: tokenizer.model, a SentencePiece model (the `sentencepiece` package runs it).
    Llama 3:   tokenizer.model, tiktoken's BPE ranks (`base64(token) rank` lines, run by `tiktoken`).
    HF hubs:   tokenizer.json, a byte-level BPE (SmolLM2, Llama 3 hub downloads), converted here
               into tiktoken's ranks and split regex, and run by `tiktoken` as well.
"""

import base64
import json
import re
from pathlib import Path

from data.files import Rule, read_json_shaped, regular_file

# Llama 3's pre-tokenizer split pattern (Meta's release).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NAMED_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
]
LLAMA3_N_SPECIALS = 256

# GPT-2's split pattern: what an HF ByteLevel pre-tokenizer with `use_regex` splits a text by.
GPT2_SPLIT_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# An HF Digits(individual_digits) step, then GPT-2's pattern on the stretches between the digits
# (SmolLM2's and StarCoder's hub files), as one regex: every digit is a piece of its own, and a
# digit ends a whitespace run the way the end of a stretch does.
DIGITS_GPT2_SPLIT_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"
# Text a tokenizer run by tiktoken must give back unchanged: tiktoken drops whatever its split
# regex does not cover (a tokenizer.json whose Split regex covers letters only trained on
# "Theansweristrue"), so every kind of character a record holds is in it: each printable ASCII
# character, the protocol's 16-space indent, newlines, letters, digits and symbols beyond ASCII.
ROUND_TRIP_PROBE = ("".join(map(chr, range(0x20, 0x7F))) + "\n" + " " * 16 + "The answer is 42, true.\n\n"
                    "café Ünïcode straße Ωμέγα дом 数字 ٣٤ ½ € — “quoted” 😀")
# The shapes (data.files.check_shape) of the files an HF tokenizer is read from: tokenizer.json,
# tokenizer_config.json (a token is its text, or an object with its "content"), and the special
# ids of config.json (an id, or a non-empty list of them).
TOKENIZER_JSON = {"model": {"vocab": {str: Rule(int, lambda v: v >= 0, "an id >= 0")}, "merges?": list},
                  "added_tokens?": [{"id": Rule(int, lambda v: v >= 0, "an id >= 0"), "content": str}],
                  "normalizer?": (None, dict), "pre_tokenizer?": (None, dict), "post_processor?": (None, dict)}
TOKEN = (None, str, {"content": str})
TOKENIZER_CONFIG = {"bos_token?": TOKEN, "eos_token?": TOKEN, "pad_token?": TOKEN, "add_bos_token?": bool | None,
                    "add_eos_token?": bool | None}
TOKEN_ID = Rule(int, lambda v: v >= 0, "an id >= 0")
TOKEN_IDS = (None, TOKEN_ID, Rule([TOKEN_ID], bool, "a non-empty list of ids"))
SPECIAL_IDS = {"bos_token_id?": TOKEN_IDS, "eos_token_id?": TOKEN_IDS, "pad_token_id?": TOKEN_IDS}
# Added tokens that end a reply in these families' formats: decoding stops at whichever exist.
END_OF_TURN_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|end_of_text|>", "<|eot_id|>")


class Tokenizer:
    """One interface over LLaMA 1/2's SentencePiece model, Llama 3's tiktoken BPE file and an HF
    byte-level tokenizer.json, told apart by sniffing the file. `encode(text, bos=True)` puts in front
    what the model's own tokenizer puts there (a tokenizer.json: what transformers adds, `add_bos`;
    SmolLM2's prompts start without a BOS, as in transformers)."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            head = regular_file(self.path).open("rb").read(256)
        except OSError as e:
            raise FileNotFoundError(f"{self.path}: cannot read tokenizer: {e}") from None
        self.add_bos = True
        if head.lstrip().startswith((b"{", b"[")):  # JSON: a tokenizer.json, whose shape is checked
            self._init_tokenizer_json()
        elif re.match(rb"[A-Za-z0-9+/=]+ \d+\r?\n", head):
            self._init_tiktoken()
        else:
            self._init_sentencepiece()

    def _init_sentencepiece(self):
        import sentencepiece

        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{self.path}: not a SentencePiece model, tiktoken BPE file or tokenizer.json: "
                             f"{e}") from None
        self.n_words = self.sp.vocab_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        if min(self.bos_id, self.eos_id) < 0:  # -1: the model has none; every prompt starts with BOS
            raise ValueError(f"{self.path}: a SentencePiece model without a BOS or EOS piece "
                             f"(bos_id {self.bos_id}, eos_id {self.eos_id}): not a LLaMA tokenizer")
        # SentencePiece LLaMA has no pad token; id 0 (<unk>) is what the commonsense recipe pads with.
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0
        self.stop_ids = {self.eos_id}
        self._encode = self.sp.encode
        self._decode = self.sp.decode

    def _init_tiktoken(self):
        import tiktoken

        ranks = {}
        with self.path.open("rb") as f:
            for n, line in enumerate(f, 1):
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
                except ValueError:
                    raise ValueError(f"{self.path}:{n}: expected 'base64 rank', found {line[:60]!r}") from None
        names = LLAMA3_NAMED_SPECIALS + [f"<|reserved_special_token_{i}|>"
                                         for i in range(2, 2 + LLAMA3_N_SPECIALS - len(LLAMA3_NAMED_SPECIALS))]
        specials = {name: len(ranks) + i for i, name in enumerate(names)}
        self.tt = tiktoken.Encoding(name=self.path.name, pat_str=LLAMA3_SPLIT_PATTERN,
                                    mergeable_ranks=ranks, special_tokens=specials)
        self.n_words = self.tt.n_vocab
        self.bos_id, self.eos_id = specials["<|begin_of_text|>"], specials["<|end_of_text|>"]
        self.pad_id = specials["<|finetune_right_pad_id|>"]
        self.stop_ids = {self.eos_id, specials["<|eot_id|>"]}
        # Special-token text in user data is encoded as ordinary text, never as control tokens.
        self._encode = lambda text: self.tt.encode(text, disallowed_special=())
        self._decode = self.tt.decode
        self._check_keeps_text()

    def _check_keeps_text(self):
        """Text in is text out: decode(encode(ROUND_TRIP_PROBE)) must be the probe, or the files
        are refused, naming the first character lost, rather than training on text with pieces
        silently missing. (SentencePiece is not probed: its own normaliser may rewrite text by design.)"""
        back = self.decode(self._encode(ROUND_TRIP_PROBE))
        if back != ROUND_TRIP_PROBE:
            at = next((i for i, (a, b) in enumerate(zip(back, ROUND_TRIP_PROBE)) if a != b), len(back))
            raise ValueError(f"{self.path}: text does not survive encoding and decoding (its pre-tokenizer does not "
                             f"cover every character?): {ROUND_TRIP_PROBE[at:at + 12]!r} at character {at} of a probe "
                             f"comes back as {back[at:at + 12]!r}")

    def _init_tokenizer_json(self):
        """Run an HF byte-level BPE tokenizer.json with tiktoken: the vocabulary gives the ranks,
        the pre-tokenizer the split regex, the added tokens the specials; tokenizer_config.json
        and config.json beside it name BOS, EOS and pad."""
        import tiktoken

        spec = read_json_shaped(self.path, TOKENIZER_JSON)
        if spec.get("normalizer") is not None:
            raise ValueError(f"{self.path}: normalizer {spec['normalizer'].get('type')!r} is not implemented "
                             f"(a byte-level BPE tokenizer.json has none)")
        pattern = byte_level_split_pattern(spec.get("pre_tokenizer"), self.path)
        specials = {token["content"]: token["id"] for token in spec.get("added_tokens", [])}
        ranks = byte_level_ranks(spec.get("model", {}), set(specials.values()), self.path)
        self.n_words = 1 + max([*ranks.values(), *specials.values()])
        # transformers drops a byte its vocabulary lacks (SmolLM2's lacks 21 that text hardly
        # holds: six control characters, and bytes UTF-8 never or all but never uses). tiktoken
        # needs a rank for every byte: such a byte gets one past the vocabulary, and encode drops
        # it. One difference is left: transformers drops the byte before merging, so the bytes
        # around it may merge, which here they cannot.
        missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
        ranks.update({byte: self.n_words + i for i, byte in enumerate(missing)})
        self.tt = tiktoken.Encoding(name=str(self.path), pat_str=pattern, mergeable_ranks=ranks,
                                    special_tokens=specials)
        self._read_hf_special_ids(spec, specials)
        # Special-token text in user data is encoded as ordinary text, never as control tokens.
        self._encode = lambda text: [t for t in self.tt.encode(text, disallowed_special=()) if t < self.n_words]
        self._decode = self.tt.decode
        self._check_keeps_text()

    def _read_hf_special_ids(self, spec: dict, specials: dict[str, int]):
        """BOS (and whether encode puts it in front), EOS, pad and the ids decoding stops at, as
        tokenizer_config.json and config.json beside a tokenizer.json name them."""
        folder = self.path.parent
        tokenizer_config, config = (read_json_shaped(folder / name, shape) if (folder / name).is_file() else {}
                                    for name, shape in (("tokenizer_config.json", TOKENIZER_CONFIG),
                                                        ("config.json", SPECIAL_IDS)))
        names = {**spec["model"]["vocab"], **specials}
        self.bos_id = hf_token_id("bos", tokenizer_config, config, names, folder)
        prefix = hf_bos_prefix(spec.get("post_processor"), tokenizer_config, self.bos_id, self.path)
        self.add_bos = prefix is not None
        self.bos_id = prefix if self.add_bos else self.bos_id
        self.eos_id = hf_token_id("eos", tokenizer_config, config, names, folder)
        if self.eos_id is None:
            raise ValueError(f"{self.path}: no EOS token: neither tokenizer_config.json's eos_token "
                             f"nor config.json's eos_token_id in {folder}")
        pad_id = hf_token_id("pad", tokenizer_config, config, names, folder)
        self.pad_id = self.eos_id if pad_id is None else pad_id  # padding is masked: any id serves
        config_eos = config.get("eos_token_id")
        self.stop_ids = ({self.eos_id} | set(config_eos if isinstance(config_eos, list) else [])
                         | {specials[name] for name in END_OF_TURN_TOKENS if name in specials})
        # config.json's ids are numbers, not names: one past the vocabulary would index past the
        # model's embedding, or name a stop token that is never generated
        outside = sorted(i for i in {self.bos_id, self.pad_id, *self.stop_ids} - {None} if i >= self.n_words)
        if outside:
            raise ValueError(f"{folder / 'config.json'}: token ids {outside} are outside the vocabulary of "
                             f"{self.n_words} ids")

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return [self.bos_id] * (bos and self.add_bos) + self._encode(text) + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return self._decode(list(ids))


# --------------------------------------------------------------------------------------------
# An HF tokenizer.json, read into tiktoken's terms


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character a token string spells a byte with ->
    that byte. Printable Latin-1 bytes are their own character; the other 68 (controls, space,
    0x7F-0xA0, 0xAD) are U+0100 onwards in byte order, so a token string never holds whitespace
    ("Ġ" is the space)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    alphabet = {chr(b): b for b in printable}
    alphabet.update({chr(0x100 + i): b for i, b in enumerate(b for b in range(256) if b not in printable)})
    return alphabet


def byte_level_split_pattern(pre_tokenizer: dict | None, path: Path) -> str:
    """tiktoken's split regex from a tokenizer.json's byte-level pre-tokenizer: ByteLevel with
    `use_regex` (GPT-2's), Digits then ByteLevel (SmolLM2's), or a Split regex then ByteLevel (Llama
    3's). A Split pattern must match every character: tiktoken drops what no match covers."""
    steps = pre_tokenizer.get("pretokenizers", [pre_tokenizer]) if pre_tokenizer else []
    kinds = [step.get("type") for step in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" and not steps[-1].get("add_prefix_space") else None
    if byte_level is not None:
        own_regex = byte_level.get("use_regex", True)
        if kinds == ["ByteLevel"] and own_regex:
            return GPT2_SPLIT_PATTERN
        if kinds == ["Digits", "ByteLevel"] and own_regex and steps[0].get("individual_digits"):
            return DIGITS_GPT2_SPLIT_PATTERN
        split = steps[0]
        if (kinds == ["Split", "ByteLevel"] and not own_regex and "Regex" in split.get("pattern", {})
                and split.get("behavior") == "Isolated" and not split.get("invert")):
            return split["pattern"]["Regex"]
    raise ValueError(f"{path}: pre_tokenizer {json.dumps(pre_tokenizer)[:300]} is not implemented; expected "
                     f"ByteLevel (use_regex, no prefix space), Digits (individual) then ByteLevel, or an "
                     f"isolating Split regex then ByteLevel (no use_regex)")


def byte_level_ranks(model: dict, added_ids: set[int], path: Path) -> dict[bytes, int]:
    """tiktoken's mergeable ranks from an HF byte-level BPE model: each token's bytes -> its id.
    tiktoken merges the lowest-ranked pair, HF the first-listed merge, so ids must grow in merge
    order and every token past the single bytes be a merge's result: both are checked."""
    if (model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix")
            or model.get("end_of_word_suffix")):
        raise ValueError(f"{path}: model {model.get('type')!r} is not a plain byte-level BPE "
                         f"(byte_fallback, subword prefixes and suffixes are not implemented)")
    alphabet = byte_level_alphabet()
    vocab = {token: i for token, i in model["vocab"].items() if i not in added_ids}
    try:
        ranks = {bytes(alphabet[c] for c in token): i for token, i in vocab.items()}
    except KeyError as e:
        raise ValueError(f"{path}: vocabulary character {e} is outside GPT-2's byte-level alphabet; "
                         f"not a byte-level BPE") from None
    previous, merged = -1, set()
    for n, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        rank = vocab.get(left + right)
        if rank is None:
            raise ValueError(f"{path}: merge {n} ({left!r}, {right!r}) makes a token the vocabulary lacks")
        if rank < previous:
            raise ValueError(f"{path}: merge {n} ({left!r}, {right!r}) makes id {rank}, after id {previous}: "
                             f"the ids must grow in merge order for tiktoken's ranks")
        previous = rank
        merged.add(left + right)
    unmerged = [token for token in vocab if len(token) > 1 and token not in merged]
    if unmerged:
        raise ValueError(f"{path}: {len(unmerged)} tokens are no merge's result (e.g. {unmerged[0]!r})")
    return ranks


def hf_token_id(kind: str, tokenizer_config: dict, config: dict, names: dict[str, int], folder: Path) -> int | None:
    """The id of tokenizer_config.json's `<kind>_token` (a string, or an object with "content"),
    else config.json's `<kind>_token_id` (the first where it lists several), else None."""
    token = tokenizer_config.get(f"{kind}_token")
    token = token.get("content") if isinstance(token, dict) else token
    if token is not None:
        if token not in names:
            raise ValueError(f"{folder / 'tokenizer_config.json'}: {kind}_token {token!r} is not in the vocabulary")
        return names[token]
    ids = config.get(f"{kind}_token_id")
    return ids[0] if isinstance(ids, list) else ids


def hf_bos_prefix(post_processor: dict | None, tokenizer_config: dict, bos_id: int | None, path: Path) -> int | None:
    """The id transformers (5.x) puts in front of every text it encodes, or None: tokenizer_config.json's
    add_bos_token where given, else the tokenizer.json post-processor's template (tokens after the
    text are not implemented)."""
    if tokenizer_config.get("add_eos_token"):
        raise ValueError(f"{path.parent / 'tokenizer_config.json'}: add_eos_token is not implemented")
    if "add_bos_token" in tokenizer_config:
        return bos_id if tokenizer_config["add_bos_token"] else None
    processors = (post_processor or {}).get("processors", [post_processor] if post_processor else [])
    unknown = {p.get("type") for p in processors} - {"ByteLevel", "TemplateProcessing"}
    templates = [p for p in processors if p.get("type") == "TemplateProcessing"]
    pieces = [item["SpecialToken"]["id"] if "SpecialToken" in item else "$A" for item in
              (templates[0].get("single", []) if templates else [{"Sequence": {}}])]
    if unknown or len(templates) > 1 or pieces not in (["$A"], [*pieces[:1], "$A"]):
        raise ValueError(f"{path}: post_processor {json.dumps(post_processor)[:300]} is not implemented; "
                         f"expected ByteLevel and at most a template of one token before the text")
    return templates[0]["special_tokens"][pieces[0]]["ids"][0] if len(pieces) == 2 else None
