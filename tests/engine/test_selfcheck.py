"""The start-up self-check (engine/selfcheck.py) on real bundles: the exporter's reference sentences
run through a variant's real ORT sessions; a tampered reference fails hard."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from bundle_edit import rewrite_manifest, unvalidate

from nmt.engine import bundle
from nmt.engine.runtime import RuntimeConfig
from nmt.engine.selfcheck import (
    NO_REFERENCE,
    PASSED,
    VALIDATED,
    Reference,
    SelfCheckError,
    selfcheck,
    startup_check,
    validated_on,
)
from nmt.engine.translator import Translator
from nmt.export.validate import REFERENCE_SENTENCES
from nmt.training.checkpoint import load_checkpoint
from nmt.training.search import greedy_search

CPU = "CPUExecutionProvider"
FP32_CPU = RuntimeConfig(device="cpu", precision="fp32", intra_op_threads=1)


@pytest.fixture(scope="module")
def reference(bundle_dir: Path) -> Reference:
    found = Reference.from_manifest(bundle.verify_bundle(bundle_dir))
    assert found is not None
    return found


def test_the_export_stores_torch_greedy_output_as_the_reference(
    bundle_dir: Path, checkpoint: Path, reference: Reference
) -> None:
    stored = bundle.verify_bundle(bundle_dir)["parity"]["reference"]
    assert 1 <= len(reference.sources) <= REFERENCE_SENTENCES and stored["min_margin"] > 0
    loaded = load_checkpoint(checkpoint)
    sources = loaded.tokenizer.encode(list(reference.sources))
    found = greedy_search(loaded.model.eval(), sources, reference.max_len_extra)
    assert [tuple(h.tokens) for h in found] == list(reference.tokens)


def test_fp32_cpu_reproduces_the_reference(bundle_dir: Path, reference: Reference) -> None:
    translator = Translator.from_bundle(bundle_dir, FP32_CPU)
    assert translator.sessions.variant == "fp32-cpu"
    selfcheck(translator, reference)  # no error
    assert startup_check(translator) == VALIDATED  # the export checked fp32-cpu on the CPU


def test_a_tampered_reference_fails_hard(bundle_dir: Path, reference: Reference) -> None:
    translator = Translator.from_bundle(bundle_dir, FP32_CPU)
    want = list(reference.tokens[0])
    bad = dataclasses.replace(reference, tokens=(tuple(want[:-1] + [want[-1] + 1]), *reference.tokens[1:]))
    with pytest.raises(SelfCheckError) as e:
        selfcheck(translator, bad)
    message = str(e.value)
    assert message.startswith(
        f"self-check failed: variant fp32-cpu on {CPU} differs from the exporter's torch "
        f"reference on 1 of {len(reference.sources)} sentences: {reference.sources[0]!r}: "
        f"expected {list(bad.tokens[0])}, got {want} ("
    )
    assert "\n" not in message  # nmt-serve prints it as one line


def test_startup_check_runs_the_reference_when_the_variant_was_not_validated(bundle_dir: Path, tmp_path: Path) -> None:
    good = rewrite_manifest(bundle_dir, tmp_path / "good", unvalidate("fp32-cpu"))
    translator = Translator.from_bundle(good, FP32_CPU)
    assert not validated_on(translator.sessions.manifest, "fp32-cpu", CPU)
    assert startup_check(translator) == PASSED
    bad = rewrite_manifest(bundle_dir, tmp_path / "bad", unvalidate("fp32-cpu", tamper=True))
    with pytest.raises(SelfCheckError, match=r"^self-check failed: variant fp32-cpu on CPUExecutionProvider"):
        startup_check(Translator.from_bundle(bad, FP32_CPU))


def test_no_reference_is_a_warning_and_a_malformed_one_an_error(
    server_bundle: Path, bundle_dir: Path, tmp_path: Path, caplog
) -> None:
    # server_bundle was exported with --no-validate: nothing checked, nothing to check against.
    translator = Translator.from_bundle(server_bundle, FP32_CPU)
    assert startup_check(translator) == NO_REFERENCE
    assert "has no parity.reference" in caplog.text

    def break_it(manifest: dict[str, Any]) -> None:
        del manifest["parity"]["reference"]["tokens"]

    broken = rewrite_manifest(bundle_dir, tmp_path / "broken", break_it)
    malformed = r"^manifest.json: parity.reference is malformed: KeyError\('tokens'\)$"
    with pytest.raises(bundle.BundleError, match=malformed):
        Reference.from_manifest(bundle.verify_bundle(broken))
