"""Tokens files, the auth settings of the Serve application, and `medray token` (no Ray needed;
the HTTP behaviour is tested against the deployed application in test_serving.py)."""

import os
import subprocess
import sys
import time

import pytest

from medray.errors import MedrayError
from serve.security import SecurityConfig, TokenStore, parse_tokens, token_id

GOOD = "a" * 20


@pytest.mark.parametrize("text, words", [
    ("short\n", ["line 1", "shorter than 16"]),
    (f"# comment\n{GOOD} cardiology\n", ["line 2", "cardiology"]),
    ("# nothing\n\n", ["holds no tokens"]),
    (f"{GOOD}\n{GOOD} genomic\n", ["line 2", "twice"]),
])
def test_bad_tokens_files_are_refused_naming_the_line(text, words):
    with pytest.raises(MedrayError) as e:
        parse_tokens(text)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_tokens_with_and_without_model_names(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"{GOOD}   # all models\n{'b' * 20} exercise genomic-gan\n")
    store = TokenStore(path)
    everyone, limited = store.authenticate(GOOD), store.authenticate("b" * 20)
    assert everyone.id == token_id(GOOD) and everyone.may_call("ultrasound")
    assert limited.may_call("exercise") and limited.may_call("genomic-gan") and not limited.may_call("genomic")
    assert store.authenticate(None) is None and store.authenticate("a" * 19) is None
    assert store.authenticate(GOOD + "a") is None and store.authenticate("") is None
    assert GOOD not in everyone.id  # logs carry an identity, not the token


def test_tokens_file_is_reread_when_it_changes_and_a_broken_one_keeps_the_old(tmp_path, monkeypatch):
    import serve.security as security

    monkeypatch.setattr(security, "RELOAD_CHECK_S", 0.0)
    path = tmp_path / "tokens"
    path.write_text(f"{GOOD}\n")
    store = TokenStore(path)
    time.sleep(0.01)
    path.write_text(f"{'c' * 20}\n")
    assert store.authenticate("c" * 20) is not None and store.authenticate(GOOD) is None
    path.write_text("too-short\n")  # an operator's mistake must not lock every client out
    assert store.authenticate("c" * 20) is not None


def test_auth_is_on_by_default_and_a_missing_tokens_file_fails_at_build_time(tmp_path):
    from serve.app import build_app

    with pytest.raises(MedrayError, match="authentication is on by default"):
        SecurityConfig.from_args(None, configure_log=False)
    with pytest.raises(MedrayError, match="cannot read"):
        build_app({"bundles": {"genomic": "x"}, "auth": {"tokens_file": str(tmp_path / "absent")}})
    with pytest.raises(ValueError, match="unknown application arg"):
        build_app({"bundles": {"genomic": "x"}, "tokens": "x"})
    with pytest.raises(ValueError, match="not allowed"):
        SecurityConfig.from_args({"enabled": False}, cors_origins=["*"], configure_log=False)
    off = SecurityConfig.from_args({"enabled": False}, configure_log=False)
    assert off.tokens is None and off.cors_origins == frozenset()


def test_medray_token_prints_a_line_a_tokens_file_accepts(tmp_path):
    out = subprocess.run([sys.executable, "-m", "medray", "token", "genomic"], capture_output=True, text=True,
                         check=True)
    line = out.stdout.strip()
    token, models = line.split(" ", 1)
    assert models == "genomic" and len(token) >= 32 and token_id(token) in out.stderr
    bad = subprocess.run([sys.executable, "-m", "medray", "token", "cardiology"], capture_output=True, text=True)
    assert bad.returncode == 2 and "cardiology" in bad.stderr
    (tmp_path / "tokens").write_text(line + "\n")
    assert TokenStore(tmp_path / "tokens").authenticate(token).models == frozenset({"genomic"})


def test_demo_token_file_is_private_and_kept(tmp_path):
    from medray.demo import write_demo_token

    path = write_demo_token(tmp_path / "tokens")
    assert os.stat(path).st_mode & 0o777 == 0o600
    first = path.read_text()
    write_demo_token(path)
    assert path.read_text() == first and len(parse_tokens(first)) == 1
