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
