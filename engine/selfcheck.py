"""Start-up self-check: the active variant must reproduce torch's greedy tokens on the bundle's reference.

The exporter checks each variant's parity on the providers it has. What it could not check there
is checked when the server starts instead: fp16-cuda exported without a GPU (its manifest entry
says `"validated": {"skipped": ...}`), fp32 checked on the CPU but served on CUDA, or any variant
of a bundle exported with --no-validate. The reference is a few sentences the exporter stored in
manifest["parity"]["reference"] with torch's greedy token ids, chosen for a wide gap between the
best and the second-best token at every step, so rounding (fp16) cannot honestly flip a token:
a difference means the graphs or the provider compute something else, and the server refuses to
start (SelfCheckError) rather than serve it.

`selfcheck` runs the reference through any variant (the tests use fp32-cpu); `startup_check`
decides whether the active one needs it. Torch-free, like the rest of engine/.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .bundle import BundleError, manifest_variants
from .decoding import DecodeOptions
from .translator import Translator

log = logging.getLogger(__name__)

# startup_check's outcomes (the `selfcheck` label of the server's nmt_engine_info).
VALIDATED, PASSED, NO_REFERENCE = "validated", "passed", "no-reference"


class SelfCheckError(BundleError):
    """The active variant does not reproduce the bundle's reference output on this provider."""


@dataclass(frozen=True)
class Reference:
    sources: tuple[str, ...]
    tokens: tuple[tuple[int, ...], ...]  # torch's greedy output per source, EOS excluded
    max_len_extra: int

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> Reference | None:
        """manifest["parity"]["reference"], or None when the export stored none (--no-validate, older bundles)."""
        stored = (manifest.get("parity") or {}).get("reference")
        if stored is None:
            return None
        try:
            sources, tokens = stored["sources"], stored["tokens"]
            reference = cls(
                tuple(map(str, sources)),
                tuple(tuple(int(t) for t in ids) for ids in tokens),
                int(stored["max_len_extra"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"manifest.json: parity.reference is malformed: {e!r}") from e
        if not reference.sources or len(reference.sources) != len(reference.tokens) or reference.max_len_extra < 1:
            raise BundleError(
                "manifest.json: parity.reference needs as many token lists as sources (at least one) "
                "and max_len_extra >= 1"
            )
        return reference


def validated_on(manifest: dict[str, Any], variant: str, provider: str) -> bool:
    """Whether the export checked this variant's parity on this provider."""
    verdict = manifest_variants(manifest).get(variant, {}).get("validated") or {}
    return "skipped" not in verdict and verdict.get("provider") == provider


def selfcheck(translator: Translator, reference: Reference) -> None:
    """Greedy-translate the reference sources; SelfCheckError naming every sentence whose tokens differ."""
    sessions = translator.sessions
    sources = translator.tokenize(list(reference.sources))
    options = DecodeOptions(beam_size=1, max_len_extra=reference.max_len_extra)
    found = translator.search(sources, options).hypotheses
    differ = [
        (i, list(want), hyps[0].tokens)
        for i, (want, hyps) in enumerate(zip(reference.tokens, found))
        if list(want) != hyps[0].tokens
    ]
    if differ:
        details = "; ".join(
            f"{reference.sources[i]!r}: expected {want}, got {got} ({translator.detokenize([got])[0]!r})"
            for i, want, got in differ
        )
        raise SelfCheckError(
            f"self-check failed: variant {sessions.variant} on {sessions.provider} differs from the "
            f"exporter's torch reference on {len(differ)} of {len(sources)} sentences: {details}"
        )


def startup_check(translator: Translator) -> str:
    """Run the reference when the export did not validate the active variant on the active provider.

    Returns VALIDATED, PASSED or NO_REFERENCE (logged with a warning: nothing to check against);
    raises SelfCheckError on a mismatch.
    """
    sessions = translator.sessions
    manifest = sessions.manifest or {}
    if validated_on(manifest, sessions.variant, sessions.provider):
        return VALIDATED
    reference = Reference.from_manifest(manifest)
    if reference is None:
        log.warning(
            "variant %s was not validated on %s at export and the bundle has no parity.reference to check "
            "it with (exported with --no-validate or by an older nmt-export)",
            sessions.variant,
            sessions.provider,
        )
        return NO_REFERENCE
    selfcheck(translator, reference)
    log.info(
        "self-check: variant %s on %s reproduced torch's greedy output on %d reference sentences",
        sessions.variant,
        sessions.provider,
        len(reference.sources),
    )
    return PASSED
