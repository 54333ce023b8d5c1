from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import pytest

from nmt.training import data
from nmt.training.data import DataError, multi30k, read_parallel, token_batches


def write(path: Path, content: bytes) -> Path:
    path.write_bytes(gzip.compress(content) if path.suffix == ".gz" else content)
    return path


def test_reads_gzipped_and_plain_files(tmp_path):
    src = write(tmp_path / "a.en.gz", "one\ntwo\n".encode())
    tgt = write(tmp_path / "a.de", "eins\r\nzwei\n".encode())
    corpus = read_parallel(src, tgt)
    assert corpus.src == ["one", "two"] and corpus.tgt == ["eins", "zwei"]


def test_missing_file_is_named(tmp_path):
    src = write(tmp_path / "a.en", b"x\n")
    with pytest.raises(DataError, match=f"missing file: {tmp_path / 'nope.de'}"):
        read_parallel(src, tmp_path / "nope.de")


def test_line_count_mismatch_gives_both_counts(tmp_path):
    src = write(tmp_path / "a.en", b"1\n2\n3\n")
    tgt = write(tmp_path / "a.de", b"1\n2\n")
    with pytest.raises(DataError, match=f"line-count mismatch: {src} has 3 lines but {tgt} has 2"):
        read_parallel(src, tgt)


def test_empty_corpus_is_refused(tmp_path):
    src, tgt = write(tmp_path / "a.en", b""), write(tmp_path / "a.de", b"")
    with pytest.raises(DataError, match=f"empty corpus: {src} has no sentences"):
        read_parallel(src, tgt)


def test_undecodable_bytes_name_the_line(tmp_path):
    src = write(tmp_path / "a.en.gz", b"fine\nalso fine\nbad \xff byte\n")
    tgt = write(tmp_path / "a.de", b"a\nb\nc\n")
    with pytest.raises(DataError, match=rf"{src}: line 3 is not valid UTF-8"):
        read_parallel(src, tgt)


def test_multi30k_from_local_directory(data_dir):
    val = multi30k("val", "en", "de", data_dir)
    assert len(val) == 1014
    assert len(multi30k("test_2016_flickr", "en", "fr", data_dir)) == 1000
    with pytest.raises(DataError, match=r"split 'test_2017_flickr' has no 'cs' file in .*; it has de, en, fr"):
        multi30k("test_2017_flickr", "en", "cs", data_dir)
    with pytest.raises(DataError, match=r"no Multi30k split 'val' in .*; the splits there are: "):
        multi30k("val", "en", "de", data_dir.parent)


def test_any_split_whose_files_exist_is_read(data_dir, tmp_path):
    """Public splits the code has no checksum for (test_2018_flickr, test_2017_mscoco) are read as they are."""
    lines = gzip.decompress((data_dir / "val.en.gz").read_bytes()).splitlines()[:7]
    write(tmp_path / "test_2018_flickr.en.gz", b"\n".join(lines) + b"\n")
    write(tmp_path / "test_2018_flickr.de", b"\n".join(lines) + b"\n")
    corpus = multi30k("test_2018_flickr", "en", "de", tmp_path)
    assert len(corpus) == 7 and corpus.src == corpus.tgt


def test_unknown_split_lists_what_is_there(data_dir, tmp_path):
    with pytest.raises(DataError) as error:
        multi30k("test_2018_flickr", "en", "de", data_dir)
    message = str(error.value)
    assert "no Multi30k split 'test_2018_flickr'" in message
    for present in ("test_2016_flickr (cs, de, en, fr)", "test_2017_flickr (de, en, fr)", "train (", "val ("):
        assert present in message
    with pytest.raises(DataError, match="data directory .*nowhere does not exist"):
        multi30k("val", "en", "de", tmp_path / "nowhere")
    with pytest.raises(DataError, match="invalid Multi30k split name '../val'"):
        multi30k("../val", "en", "de", data_dir)


def test_known_files_are_verified_in_a_local_directory(data_dir, tmp_path):
    (tmp_path / "val.en.gz").write_bytes((data_dir / "val.de.gz").read_bytes())  # wrong content
    (tmp_path / "val.de.gz").write_bytes((data_dir / "val.de.gz").read_bytes())
    with pytest.raises(DataError, match=r"checksum mismatch for .*val.en.gz"):
        multi30k("val", "en", "de", tmp_path)


def test_download_refuses_unknown_splits(monkeypatch):
    monkeypatch.delenv("NMT_DATA_DIR", raising=False)
    with pytest.raises(
        DataError, match="unknown Multi30k split 'test_2018_flickr': only train, val, .* can be downloaded"
    ):
        data.multi30k_path("test_2018_flickr", "en")


def test_download_verifies_the_checksum(data_dir, tmp_path, monkeypatch):
    """The real download path, served from a file:// mirror: good files land, bad ones never do."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    good = (data_dir / "val.de.gz").read_bytes()
    (mirror / "val.de.gz").write_bytes(good)
    (mirror / "val.en.gz").write_bytes(good)  # wrong content under the English name
    cache = tmp_path / "cache"
    url = mirror.as_uri() + "/"
    path = data.download_verified("val.de.gz", cache, url)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == data.MULTI30K_SHA256["val.de.gz"]
    with pytest.raises(DataError, match="checksum mismatch for downloaded val.en.gz"):
        data.download_verified("val.en.gz", cache, url)
    assert sorted(p.name for p in cache.iterdir()) == ["val.de.gz"]  # nothing corrupt left behind
    with pytest.raises(DataError, match="cannot download"):
        data.download_verified("val.fr.gz", cache, url)
    # without NMT_DATA_DIR, multi30k_path uses the cache (here already holding a verified copy)
    monkeypatch.delenv("NMT_DATA_DIR", raising=False)
    monkeypatch.setattr(data, "default_cache_dir", lambda: cache)
    assert data.multi30k_path("val", "de") == cache / "val.de.gz"


def test_token_batches_cover_every_example_once_within_budget():
    src = [3, 8, 5, 20, 7, 7, 2, 15, 9, 11] * 5
    tgt = [4, 9, 5, 18, 6, 8, 3, 14, 10, 12] * 5
    batches = token_batches(src, tgt, max_tokens=40, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(len(src)))
    for b in batches:
        assert max(max(src[i], tgt[i]) for i in b) * len(b) <= 40
    assert batches == token_batches(src, tgt, max_tokens=40, seed=3)
    assert batches != token_batches(src, tgt, max_tokens=40, seed=4)
    with pytest.raises(DataError, match="example 3 has 20 tokens, more than --max-tokens 10"):
        token_batches(src, tgt, max_tokens=10)
