"""Training samples in the LLaVA-style JSON/JSONL format, and their conversion to token ids.

Every problem with a sample is found when the file is read and kept as a ``BadSample`` with its
index and reason. The reference instead swapped in a random other sample on any error
(reference-training.md §7.15), which hid broken data. Nothing here needs transformers: a word
tokenizer covers tiny runs, and any object with ``encode(str) -> list[int]`` works too.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Protocol, Sequence, Union

from viq.errors import ConfigError

IMAGE_TOKEN = "<image>"
#: label of positions that carry no loss (PyTorch's cross-entropy ignore_index).
IGNORE_INDEX = -100
#: id put at image positions when the tokenizer has no <image> token (the reference's IMAGE_TOKEN_INDEX).
IMAGE_PLACEHOLDER_ID = -200
ROLES = ("human", "gpt")


# ---- samples ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resize:
    """A sample's ``resize``: ``"<base>x<patch>"`` keeps the area near base^2 with sides multiple of
    patch (patch 0: a base x base square); the list form ``[w, h]`` is an exact size."""

    base: int = 0
    patch: int = 0
    size: Optional[tuple[int, int]] = None

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """The (W, H) an image of width x height is resized to, as the reference computes it."""
        if self.size is not None:
            return max(self.size[0], 64), max(self.size[1], 64)  # the reference's floor for the list form
        if self.patch <= 0:
            return self.base, self.base
        s = math.sqrt(self.base * self.base / (width * height))
        p = self.patch
        return max(int(width * s / p) * p, p), max(int(height * s / p) * p, p)


def parse_resize(value: Any) -> Resize:
    """``"384x32"`` or ``[w, h]`` -> Resize; ValueError with the reason otherwise."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", value)
        if not m or int(m.group(1)) < 1:
            raise ValueError(f"resize {value!r} must look like '<base>x<patch>' (e.g. '384x32')")
        return Resize(base=int(m.group(1)), patch=int(m.group(2)))
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        return Resize(size=(value[0], value[1]))
    raise ValueError(f"resize {value!r} must be '<base>x<patch>' or [width, height]")


@dataclass(frozen=True)
class ImageRef:
    """Where one image of a sample lives, and how to resize it (None = the recipe's default)."""

    path: Path
    source: str  # as written in the file: the key for code-store lookups
    resize: Optional[Resize] = None
    #: packed shards: read ``length`` bytes at ``offset`` of ``path`` (optionally base64 text).
    offset: Optional[int] = None
    length: Optional[int] = None
    base64: bool = False


@dataclass(frozen=True)
class Turn:
    role: str  # "human" or "gpt"
    text: str


@dataclass(frozen=True)
class Sample:
    index: int
    id: Optional[str]
    images: tuple[ImageRef, ...]
    turns: tuple[Turn, ...]
    raw: dict = field(repr=False, compare=False, default_factory=dict)


@dataclass(frozen=True)
class BadSample:
    index: int
    id: Optional[str]
    reason: str

    def __str__(self) -> str:
        name = f" (id {self.id})" if self.id is not None else ""
        return f"sample {self.index}{name}: {self.reason}"


@dataclass
class SampleSet:
    """The good samples of a file in order, plus every bad one with its reason."""

    path: Optional[Path]
    samples: list[Sample]
    bad: list[BadSample]

    @property
    def total(self) -> int:
        return len(self.samples) + len(self.bad)

    @property
    def bad_fraction(self) -> float:
        return len(self.bad) / self.total if self.total else 0.0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def summary(self) -> str:
        return f"{self.path}: {len(self.samples)} good, {len(self.bad)} bad of {self.total} samples"


def _image_ref(entry: Any, k: int, root: Path, check_files: bool) -> ImageRef:
    """One ``image`` entry -> ImageRef; ValueError naming the entry otherwise."""
    if isinstance(entry, str):  # a bare path: accepted for convenience
        entry = {"img_path": entry}
    if not isinstance(entry, dict):
        raise ValueError(f"image {k} must be {{'img_path': ..., 'resize': ...}}, got {type(entry).__name__}")
    packed = "patch" in entry
    source = entry.get("patch" if packed else "img_path")
    if not isinstance(source, str) or not source:
        raise ValueError(f"image {k} has no {'patch' if packed else 'img_path'} string")
    path = Path(source) if Path(source).is_absolute() else root / source
    if check_files and not path.is_file():
        raise ValueError(f"image {k} not found: {path}")
    resize = None
    if entry.get("resize") is not None:
        try:
            resize = parse_resize(entry["resize"])
        except ValueError as exc:
            raise ValueError(f"image {k}: {exc}") from None
    if not packed:
        return ImageRef(path=path, source=source, resize=resize)
    offset, length = entry.get("start_num"), entry.get("size")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, length)):
        raise ValueError(f"image {k}: a packed entry needs integer start_num and size")
    return ImageRef(path=path, source=source, resize=resize, offset=offset, length=length,
                    base64=entry.get("image_encoding") == "base64")


def validate_sample(sample: Any, index: int, image_root: Union[str, Path, None] = None,
                    check_files: bool = True) -> Union[Sample, BadSample]:
    """Check one raw sample; the reason of the first problem found, or a parsed Sample.

    Image paths resolve against ``image_root`` (default: the working directory). With
    ``check_files=False`` (images come from a code store) their existence is not checked.
    """
    sid = sample.get("id") if isinstance(sample, dict) else None
    sid = None if sid is None else str(sid)
    try:
        if not isinstance(sample, dict):
            raise ValueError(f"a sample must be an object, got {type(sample).__name__}")
        turns = _turns(sample.get("conversations"))
        images = sample.get("image")
        images = [] if images is None else images if isinstance(images, list) else [images]
        root = Path(image_root) if image_root is not None else Path()
        refs = tuple(_image_ref(e, k, root, check_files) for k, e in enumerate(images))
        n_tokens = sum(t.text.count(IMAGE_TOKEN) for t in turns)
        if n_tokens != len(refs):
            raise ValueError(f"{n_tokens} {IMAGE_TOKEN} token(s) but {len(refs)} image(s)")
    except ValueError as exc:
        return BadSample(index, sid, str(exc))
    return Sample(index=index, id=sid, images=refs, turns=turns, raw=sample)


def _turns(conversations: Any) -> tuple[Turn, ...]:
    if not isinstance(conversations, list) or not conversations:
        raise ValueError("no 'conversations' list")
    turns = []
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ValueError(f"turn {k} must be {{'from': ..., 'value': <text>}}")
        role, expected = turn.get("from"), ROLES[k % 2]
        if role not in ROLES:
            raise ValueError(f"turn {k} is from {role!r}; roles are 'human' and 'gpt'")
        if role != expected:
            raise ValueError(f"turn {k} is from {role!r} but {expected!r} was expected "
                             "(turns alternate human/gpt, starting with human)")
        if role == "gpt" and IMAGE_TOKEN in turn["value"]:
            raise ValueError(f"turn {k} (gpt) contains {IMAGE_TOKEN}; images belong in human turns")
        turns.append(Turn(role, turn["value"]))
    if len(turns) < 2:
        raise ValueError("no gpt turn: nothing to learn from")
    return tuple(turns)


def read_records(path: Union[str, Path]) -> Iterator[tuple[int, Any]]:
    """(index, record) for a .json list or a .jsonl file; undecodable JSONL lines yield a BadSample."""
    path = Path(path)
    if path.suffix not in (".json", ".jsonl"):
        raise ConfigError(f"{path}: data files must be .json (a list) or .jsonl")
    if not path.is_file():
        raise ConfigError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: invalid JSON: {exc}") from None
        if not isinstance(records, list):
            raise ConfigError(f"{path}: a .json data file must hold a list of samples")
        yield from enumerate(records)
        return
    index = 0
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield index, json.loads(line)
        except json.JSONDecodeError as exc:
            yield index, BadSample(index, None, f"line {line_no}: invalid JSON: {exc.msg}")
        index += 1


def load_samples(path: Union[str, Path], image_root: Union[str, Path, None] = None,
                 check_files: bool = True) -> SampleSet:
    """Read and check every sample; relative image paths resolve against image_root, else the file's folder."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    good, bad = [], []
    for index, record in read_records(path):
        result = record if isinstance(record, BadSample) else validate_sample(record, index, root, check_files)
        (bad if isinstance(result, BadSample) else good).append(result)
    return SampleSet(path=path, samples=good, bad=bad)


def sample_texts(samples: Iterable[Sample]) -> Iterator[str]:
    """Every turn's text, for building a tokenizer vocabulary."""
    for s in samples:
        for t in s.turns:
            yield t.text


# ---- tokenizers -------------------------------------------------------------------------------


class TextTokenizer(Protocol):
    """Anything that turns text into ids: a WordTokenizer, a transformers tokenizer, ..."""

    def encode(self, text: str) -> list[int]: ...


class WordTokenizer:
    """A word-level tokenizer for tiny runs: specials first, then words; punctuation is its own token."""

    DEFAULT_SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>", IMAGE_TOKEN, "<user>", "<assistant>")

    def __init__(self, vocab: Sequence[str], specials: Sequence[str] = DEFAULT_SPECIALS):
        if list(vocab[:len(specials)]) != list(specials):
            raise ConfigError("a WordTokenizer vocabulary must start with its special tokens")
        if len(set(vocab)) != len(vocab):
            raise ConfigError("a WordTokenizer vocabulary has duplicate tokens")
        self.vocab = list(vocab)
        self.specials = list(specials)
        self._ids = {tok: i for i, tok in enumerate(self.vocab)}
        alternatives = [re.escape(s) for s in sorted(self.specials, key=len, reverse=True)]
        self._pattern = re.compile("|".join(alternatives + [r"\w+", r"[^\w\s]"]))

    @classmethod
    def from_texts(cls, texts: Iterable[str], specials: Sequence[str] = DEFAULT_SPECIALS) -> "WordTokenizer":
        """Vocabulary = specials + every word of the texts, sorted (deterministic)."""
        specials = list(specials)
        words = set()
        for text in texts:
            words.update(re.findall(r"\w+|[^\w\s]", _strip_specials(text, specials)))
        return cls(specials + sorted(words - set(specials)), specials)

    def __len__(self) -> int:
        return len(self.vocab)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._ids.get(token)

    pad_id = property(lambda self: self._ids.get("<pad>"))
    unk_id = property(lambda self: self._ids.get("<unk>"))
    bos_id = property(lambda self: self._ids.get("<bos>"))
    eos_id = property(lambda self: self._ids.get("<eos>"))
    image_token_id = property(lambda self: self._ids.get(IMAGE_TOKEN))

    def tokenize(self, text: str) -> list[str]:
        return self._pattern.findall(text)

    def encode(self, text: str) -> list[int]:
        ids = []
        for tok in self.tokenize(text):
            i = self._ids.get(tok, self.unk_id)
            if i is None:
                raise ConfigError(f"{tok!r} is not in the vocabulary and the tokenizer has no <unk>")
            ids.append(i)
        return ids

    def decode(self, ids: Iterable[int], skip_specials: bool = False) -> str:
        special = set(self.specials)
        toks = [self.vocab[i] for i in ids if 0 <= i < len(self.vocab)]
        if skip_specials:
            toks = [t for t in toks if t not in special]
        return re.sub(r" ([^\w\s<])", r"\1", " ".join(toks))  # no space before punctuation

    def save(self, path: Union[str, Path]) -> None:
        data = {"format": "viq-word-tokenizer", "version": 1, "specials": self.specials, "vocab": self.vocab}
        Path(path).write_text(json.dumps(data, indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: Union[str, Path]) -> "WordTokenizer":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            if data.get("format") != "viq-word-tokenizer":
                raise ValueError("not a viq word tokenizer")
            return cls(data["vocab"], data["specials"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"cannot read word tokenizer {path}: {exc}") from None


def _strip_specials(text: str, specials: Sequence[str]) -> str:
    for s in specials:
        text = text.replace(s, " ")
    return text


# ---- conversations -> ids ---------------------------------------------------------------------


@dataclass(frozen=True)
class ChatTemplate:
    """Text around each turn. The answer and ``end`` after it are supervised; the rest is not."""

    system: str
    user: str
    assistant: str
    end: str
    bos: str = ""


TEMPLATES = {
    # v1_qwen2; unlike the reference we do not supervise the 2 legacy tokens "assistant\n" (§7.20)
    "qwen2": ChatTemplate(system="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
                          user="<|im_start|>user\n", assistant="<|im_start|>assistant\n", end="<|im_end|>\n"),
    "plain": ChatTemplate(system="", user="<user> ", assistant="<assistant> ", end=" <eos>", bos="<bos>"),
}


@dataclass(frozen=True)
class EncodedSample:
    """Token ids, labels (IGNORE_INDEX except on answers) and where the image features go."""

    input_ids: list[int]
    labels: list[int]
    #: one position per image, in order; input_ids there hold the image token id.
    image_positions: list[int]


def _encode(tokenizer: TextTokenizer, text: str) -> list[int]:
    if isinstance(tokenizer, WordTokenizer):
        return tokenizer.encode(text)
    try:  # transformers tokenizers: no BOS/EOS added per piece
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:
        return list(tokenizer.encode(text))


def encode_conversation(turns: Union[Sample, Sequence[Turn]], tokenizer: TextTokenizer,
                        template: Union[str, ChatTemplate] = "plain",
                        image_token_id: Optional[int] = None) -> EncodedSample:
    """Turns -> (input_ids, labels, image positions); each ``<image>`` becomes one id.

    Pieces are tokenized separately, so the label mask is exact (the reference re-tokenized and
    masked whole samples on a length mismatch). Truncation is the collator's job: it must not cut
    an image's span once features are spliced in.
    """
    if isinstance(turns, Sample):
        turns = turns.turns
    tpl = TEMPLATES[template] if isinstance(template, str) else template
    if image_token_id is None:
        image_token_id = getattr(tokenizer, "image_token_id", None)
        image_token_id = IMAGE_PLACEHOLDER_ID if image_token_id is None else image_token_id
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []

    def add(text: str, supervised: bool) -> None:
        for k, chunk in enumerate(text.split(IMAGE_TOKEN)):
            if k:
                positions.append(len(ids))
                ids.append(image_token_id)
                labels.append(IGNORE_INDEX)
            if chunk:
                piece = _encode(tokenizer, chunk)
                ids.extend(piece)
                labels.extend(piece if supervised else [IGNORE_INDEX] * len(piece))

    add(tpl.bos + tpl.system, False)
    for turn in turns:
        if turn.role == "human":
            add(tpl.user + turn.text + tpl.end, False)
        else:
            add(tpl.assistant, False)
            add(turn.text + tpl.end, True)
    return EncodedSample(ids, labels, positions)
