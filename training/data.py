"""Parallel corpora: Multi30k (local directory or verified download) and plain-text files.

Bad input raises `DataError` with a message that names the file.
"""

from __future__ import annotations

import gzip
import os
import random
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from nmt.engine.bundle import sha256_file

MULTI30K_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/"
MULTI30K_SPLITS = {
    "train": ("en", "de", "fr", "cs"),
    "val": ("en", "de", "fr", "cs"),
    "test_2016_flickr": ("en", "de", "fr", "cs"),
    "test_2017_flickr": ("en", "de", "fr"),
}
MULTI30K_SHA256 = {
    "test_2016_flickr.cs.gz": "200a4a74cc9560f051924abb9803be008d1908d77f747e9141aeb86dfd2797f1",
    "test_2016_flickr.de.gz": "9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8",
    "test_2016_flickr.en.gz": "611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9",
    "test_2016_flickr.fr.gz": "6d326e188d259fb1d04ac19eae3af956559b3a0b93d7635e56c90987c40c8b90",
    "test_2017_flickr.de.gz": "a2c89666db00c495cd8513b9d708d5a3acc205d7de312ef2bf5fb7ebc1540aee",
    "test_2017_flickr.en.gz": "76a444ee25172e72695cddb13ae4a3bda59430617be88e0bb46b60504f054074",
    "test_2017_flickr.fr.gz": "3ba671ceb2299f3304ffafefea7a833d08632fbaf0ba18546f8a2ec2391af496",
    "train.cs.gz": "a65adb8b32e3bc664f21ecba7a6e7f6950fd1f405e135f7c312faabdb6255077",
    "train.de.gz": "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6",
    "train.en.gz": "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f",
    "train.fr.gz": "622e75069e9f4c577425c4f277116ce66e63a2401c0a2312d90073cb12379a3c",
    "val.cs.gz": "b63226e05c4bd5dd6a42897d74b86a1b9d2c31498252c572b1ea7f7996927fcc",
    "val.de.gz": "f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a",
    "val.en.gz": "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28",
    "val.fr.gz": "ca3106f1a72390591d25f6c45cb4cd39dec4cd3f123e099748a3ce5256c160e9",
}


class DataError(ValueError):
    """A corpus file is missing, unreadable or malformed; the message names the file."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nmt" / "multi30k"


def download_verified(name: str, cache_dir: Path, base_url: str = MULTI30K_URL) -> Path:
    """Fetch one Multi30k file into `cache_dir` unless a verified copy is already there."""
    expected = MULTI30K_SHA256[name]
    target = cache_dir / name
    if target.is_file() and sha256_file(target) == expected:
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Download beside the target and rename only once verified: never a corrupt file in the cache.
    with tempfile.NamedTemporaryFile(dir=cache_dir, prefix=f".{name}.", delete=False) as tmp:
        try:
            with urllib.request.urlopen(base_url + name, timeout=60) as response:
                shutil.copyfileobj(response, tmp)
        except OSError as e:
            os.unlink(tmp.name)
            raise DataError(f"cannot download {base_url + name}: {e}") from e
    actual = sha256_file(Path(tmp.name))
    if actual != expected:
        os.unlink(tmp.name)
        raise DataError(f"checksum mismatch for downloaded {name}: expected sha256 {expected}, got {actual}")
    os.replace(tmp.name, target)
    return target


def multi30k_path(split: str, lang: str, data_dir: str | Path | None = None) -> Path:
    """Path of a Multi30k file: from `data_dir` (or $NMT_DATA_DIR), else downloaded into the cache.

    Any split name works whose file is in the data directory (test_2018_flickr, test_2017_mscoco,
    ...); files whose checksum the code knows (MULTI30K_SHA256) are verified, others are taken as
    they are. Downloads are limited to the known files, which are always verified.
    """
    if not split or "/" in split or split.startswith("."):
        raise DataError(f"invalid Multi30k split name {split!r}")
    name = f"{split}.{lang}.gz"
    data_dir = data_dir or os.environ.get("NMT_DATA_DIR")
    if data_dir:
        for candidate in (Path(data_dir) / name, Path(data_dir) / name[: -len(".gz")]):
            if candidate.is_file():
                if candidate.name in MULTI30K_SHA256 and sha256_file(candidate) != MULTI30K_SHA256[candidate.name]:
                    raise DataError(
                        f"checksum mismatch for {candidate}: expected sha256 {MULTI30K_SHA256[candidate.name]}"
                    )
                return candidate
        raise DataError(_missing_split_message(split, lang, Path(data_dir)))
    if split not in MULTI30K_SPLITS:
        raise DataError(
            f"unknown Multi30k split {split!r}: only {', '.join(MULTI30K_SPLITS)} can be downloaded "
            "(with verified checksums); put other splits' files in a directory and pass it with "
            "--data-dir or $NMT_DATA_DIR"
        )
    if lang not in MULTI30K_SPLITS[split]:
        raise DataError(f"Multi30k {split} has no {lang!r}; it has {', '.join(MULTI30K_SPLITS[split])}")
    return download_verified(name, default_cache_dir())


def local_splits(data_dir: Path) -> dict[str, list[str]]:
    """{split: [languages]} of the `SPLIT.LANG[.gz]` files in a directory."""
    found: dict[str, set[str]] = {}
    if data_dir.is_dir():
        for path in data_dir.iterdir():
            stem = path.name[: -len(".gz")] if path.name.endswith(".gz") else path.name
            split, dot, lang = stem.rpartition(".")
            if dot and split and 2 <= len(lang) <= 3 and lang.isalpha():
                found.setdefault(split, set()).add(lang)
    return {k: sorted(v) for k, v in sorted(found.items())}


def _missing_split_message(split: str, lang: str, data_dir: Path) -> str:
    if not data_dir.is_dir():
        return f"data directory {data_dir} does not exist"
    there = local_splits(data_dir)
    listing = "; ".join(f"{k} ({', '.join(v)})" for k, v in there.items()) or "no SPLIT.LANG[.gz] files"
    if split in there:
        return f"Multi30k split {split!r} has no {lang!r} file in {data_dir} ({data_dir / f'{split}.{lang}.gz'} missing); it has {', '.join(there[split])}"
    return f"no Multi30k split {split!r} in {data_dir}; the splits there are: {listing}"


def read_lines(path: str | Path) -> list[str]:
    """Lines of a UTF-8 text file, gzipped or not, without their line endings."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing file: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    lines = []
    try:
        with opener(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    lines.append(raw.decode("utf-8").rstrip("\r\n"))
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}: line {number} is not valid UTF-8 ({e.reason} at byte {e.start})") from e
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    return lines


@dataclass(frozen=True)
class ParallelCorpus:
    src: list[str]
    tgt: list[str]

    def __len__(self) -> int:
        return len(self.src)


def read_parallel(src_path: str | Path, tgt_path: str | Path) -> ParallelCorpus:
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise DataError(f"line-count mismatch: {src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}")
    if not src or all(not s.strip() for s in src):
        raise DataError(f"empty corpus: {src_path} has no sentences")
    return ParallelCorpus(src, tgt)


def multi30k(split: str, src_lang: str, tgt_lang: str, data_dir: str | Path | None = None) -> ParallelCorpus:
    return read_parallel(multi30k_path(split, src_lang, data_dir), multi30k_path(split, tgt_lang, data_dir))


def token_batches(
    src_lengths: list[int], tgt_lengths: list[int], max_tokens: int, seed: int | None = None
) -> list[list[int]]:
    """Group example indices into batches of at most `max_tokens` (padded, per side).

    Examples are sorted by length (ties broken at random when `seed` is given), cut into
    batches so that padding stays small, and the batch order is shuffled with `seed`.
    """
    for i, (s, t) in enumerate(zip(src_lengths, tgt_lengths)):
        if max(s, t) > max_tokens:
            raise DataError(f"example {i} has {max(s, t)} tokens, more than --max-tokens {max_tokens}")
    rng = random.Random(seed)
    order = list(range(len(src_lengths)))
    if seed is not None:
        rng.shuffle(order)  # random tie-breaking inside a length bucket
    order.sort(key=lambda i: (tgt_lengths[i], src_lengths[i]))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        length = max(src_lengths[i], tgt_lengths[i])
        if current and max(longest, length) * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, length)
    if current:
        batches.append(current)
    if seed is not None:
        rng.shuffle(batches)
    return batches
