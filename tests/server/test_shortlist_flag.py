"""nmt-serve --shortlist on|off (NMT_SHORTLIST): whether the engine scores the bundle's vocabulary shortlist."""

from __future__ import annotations

import pytest

from nmt.server.config import ServerConfig, from_args


def test_the_shortlist_flag_and_its_environment_variable() -> None:
    assert from_args([], {"NMT_MODEL_DIR": "/b"}).runtime().shortlist is False
    assert from_args([], {"NMT_MODEL_DIR": "/b", "NMT_SHORTLIST": "on"}).runtime().shortlist is True
    assert not from_args(["--shortlist", "off"], {"NMT_MODEL_DIR": "/b", "NMT_SHORTLIST": "on"}).runtime().shortlist
    with pytest.raises(SystemExit):
        from_args(["--shortlist", "maybe"], {"NMT_MODEL_DIR": "/b"})
    with pytest.raises(ValueError, match="^shortlist must be on or off, got 'yes'$"):
        ServerConfig(model_dir="/b", shortlist="yes")


def test_the_step_decoder_flag_and_the_per_row_decoder_of_continuous_batching() -> None:
    """--step-decoder on (default) runs the bundle's step decoders; the per-row one opens only for
    --batching continuous (it is the only user); off serves the traced decoder, as before them."""
    env = {"NMT_MODEL_DIR": "/b"}
    static, running = from_args([], env).runtime(), from_args(["--batching", "continuous"], env).runtime()
    assert (static.step_decoder, static.per_row_decoder) == (True, False)
    assert (running.step_decoder, running.per_row_decoder) == (True, True)
    assert from_args([], {**env, "NMT_STEP_DECODER": "off"}).runtime().step_decoder is False
    with pytest.raises(ValueError, match="^step_decoder must be on or off, got 'yes'$"):
        ServerConfig(model_dir="/b", step_decoder="yes")
