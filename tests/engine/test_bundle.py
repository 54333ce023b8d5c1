from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from nmt.engine import bundle
from nmt.engine.bundle import BundleError, read_manifest, sha256_file, staging_dir, swap_in, verify_bundle
from nmt.export.export import export_checkpoint

FILES = [
    bundle.ENCODER,
    bundle.DECODER,
    bundle.ENCODER_CPU,
    bundle.DECODER_CPU,
    bundle.ENCODER_INT8,
    bundle.DECODER_INT8,
    bundle.ENCODER_FP16,
    bundle.DECODER_FP16,
    bundle.TOKENIZER,
    bundle.SHORTLIST,
    bundle.STEP_DECODER_CPU,
    bundle.STEP_DECODER_INT8,
    bundle.ROWS_DECODER_CPU,
    bundle.ROWS_DECODER_INT8,
]


@pytest.fixture
def copy(bundle_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle_dir, tmp_path / "bundle"))


def test_manifest_describes_the_bundle(bundle_dir: Path, checkpoint: Path) -> None:
    manifest = verify_bundle(bundle_dir)
    assert manifest["format"] == "nmt-bundle" and manifest["format_version"] == 3
    assert sorted(manifest["files"]) == sorted(FILES)
    assert manifest["files"][bundle.TOKENIZER]["sha256"] == sha256_file(checkpoint / "spm.model")
    assert manifest["model"]["d_model"] == 32 and manifest["special_ids"] == {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
    assert (manifest["src_lang"], manifest["tgt_lang"]) == ("en", "de")
    assert (manifest["attention"], manifest["opset"]) == ("onnx", 23)
    assert set(manifest["versions"]) == {"onnx", "onnxruntime", "torch"}
    assert len(manifest["source_checkpoint"]["sha256"]) == 64
    assert list(manifest["interface"]["decoder"]["inputs"]) == [
        *bundle.decoder_inputs(2),
        bundle.VOCAB_IDS,
        bundle.TOP_K,
    ]
    assert manifest["shortlist"] == {
        "file": bundle.SHORTLIST,
        "corpus": "multi30k train",
        "sentence_pairs": 29000,
        "per_source": 20,
        "frequent": 300,
    }


@pytest.mark.parametrize("name", [*FILES, bundle.MANIFEST])
def test_a_flipped_byte_is_refused_naming_the_file(copy: Path, name: str) -> None:
    data = bytearray((copy / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / name).write_bytes(bytes(data))
    with pytest.raises(BundleError) as e:
        verify_bundle(copy)
    if name == bundle.MANIFEST:
        assert f"{copy / bundle.MANIFEST}" in str(e.value)
    else:
        assert f"\n  {name}: sha256 " in str(e.value) and "does not match the manifest" in str(e.value)


def test_missing_and_unlisted_files_are_all_reported(copy: Path) -> None:
    (copy / bundle.DECODER).unlink()
    (copy / "extra.bin").write_bytes(b"x")
    with pytest.raises(BundleError) as e:
        verify_bundle(copy)
    assert str(e.value) == (
        f"bundle {copy} failed verification:\n  {bundle.DECODER}: missing\n  extra.bin: not listed in the manifest"
    )


def test_an_unknown_format_version_is_refused(copy: Path) -> None:
    path = copy / bundle.MANIFEST
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": 99}))
    with pytest.raises(BundleError) as e:
        read_manifest(copy)
    assert str(e.value) == f"{path}: format_version 99 is not supported (this code reads versions 1, 2, 3)"


def test_export_refuses_to_overwrite_without_force(checkpoint: Path, bundle_dir: Path) -> None:
    before = sha256_file(bundle_dir / bundle.MANIFEST)
    with pytest.raises(BundleError) as e:
        export_checkpoint(checkpoint, bundle_dir)
    assert str(e.value) == f"{bundle_dir} already exists; pass force=True (--force) to replace it"
    assert sha256_file(bundle_dir / bundle.MANIFEST) == before


def test_force_replaces_a_bundle_whole(tmp_path: Path) -> None:
    out = tmp_path / "b"
    out.mkdir()
    (out / "old.txt").write_text("old")
    staging = staging_dir(out, force=True)
    (staging / "new.txt").write_text("new")
    swap_in(staging, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]


def _reseal(directory: Path, manifest: dict) -> None:
    """Write a changed manifest with its own hash recomputed (so only the change is under test)."""
    manifest[bundle.SELF_HASH] = bundle.content_hash(manifest)
    (directory / bundle.MANIFEST).write_text(json.dumps(manifest))


def test_a_variant_naming_an_unlisted_file_is_refused(copy: Path) -> None:
    manifest = read_manifest(copy)
    manifest["variants"]["int8-cpu"]["encoder"] = "nope.onnx"
    _reseal(copy, manifest)
    with pytest.raises(BundleError) as e:
        verify_bundle(copy)
    assert str(e.value) == (
        f"bundle {copy} failed verification:\n  variant int8-cpu: 'nope.onnx' is not a file listed in the manifest"
    )


def test_a_version_1_bundle_is_still_read(copy: Path) -> None:
    graphs = {
        "encoder": bundle.ENCODER,
        "decoder": bundle.DECODER,
        "encoder_cpu": bundle.ENCODER_CPU,
        "decoder_cpu": bundle.DECODER_CPU,
    }
    manifest = read_manifest(copy)
    del manifest["variants"]
    manifest.update(format_version=1, graphs=graphs)
    _reseal(copy, manifest)
    variants = bundle.manifest_variants(verify_bundle(copy))
    assert list(variants) == ["fp32", "fp32-cpu"]
    assert variants["fp32-cpu"] == {
        "encoder": bundle.ENCODER_CPU,
        "decoder": bundle.DECODER_CPU,
        "providers": ["CPUExecutionProvider"],
        "kv_dtype": "float32",
    }
