"""The Hub token comes from the environment or .env, and never lands in a run folder."""

from __future__ import annotations

import pytest
from helpers import tiny_recipe
from lorakit.secrets import hub_token, redact


def test_env_wins_over_dotenv(tmp_path, monkeypatch):
    for name in ("HF_TOKEN", "HUGGINGFACE_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / ".env").write_text("# comment\nexport HF_TOKEN='hf_from_file'\n")
    assert hub_token((tmp_path,)) == "hf_from_file"
    monkeypatch.setenv("HUGGINGFACE_TOKEN", "hf_from_env")
    assert hub_token((tmp_path,)) == "hf_from_env"


def test_no_token_anywhere(tmp_path, monkeypatch):
    for name in ("HF_TOKEN", "HUGGINGFACE_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    assert hub_token((tmp_path,)) is None


def test_redact():
    assert redact("401 for token hf_abc at url", "hf_abc") == "401 for token <HF_TOKEN> at url"
    assert redact("nothing", None) == "nothing"


@pytest.mark.parametrize(
    "template",
    [
        "http://alice:{}@127.0.0.1:1/path",
        'tracking_uri = "http://alice:{}@mlflow.example"',
        "{{'uri': 'http://alice:{}@h', 'mail': 'a@b.c'}}",
        '{{"uri":"http://alice:{}@h","next":"x@y"}}',
    ],
)
def test_a_url_password_is_masked_whatever_characters_it_holds(template):
    """A password with ' " # ? / @ (which a URL should percent-encode, and people do not)
    was printed and written as it was: the pattern stopped at those characters."""
    import string

    from lorakit.secrets import mask

    for ch in string.printable.strip():
        password = f"Sup{ch}3r{ch}x"
        masked = mask(template.format(password))
        assert "Sup" not in masked and "3r" not in masked, (ch, masked)
        assert "alice:***@" in masked
    # a token's @ is the first one when a later @ follows in the path or query
    for text, masked in (
        (
            "git+https://hf_abc123@github.com/o/r.git@main",
            "git+https://***@github.com/o/r.git@main",
        ),
        ("https://TOKEN@host/p?mail=a@b.c", "https://***@host/p?mail=a@b.c"),
        ("https://u:pw@host/path?x=a@b", "https://u:***@host/path?x=a@b"),
    ):
        assert mask(text) == masked
    # what is not a userinfo stays as it was
    for text in (
        "http://host/path@x",
        "see http://host:8080/ and mail a@b.com",
        "https://registry.npmjs.org/@scope/pkg",
    ):
        assert mask(text) == text


@pytest.mark.slow
def test_token_never_written_to_run_folder(tmp_path, monkeypatch, tiny_model_dir, chat_file, cli):

    secret = "hf_SECRET_never_saved_123"
    monkeypatch.setenv("HF_TOKEN", secret)
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, extra='name = "s"')
    code, out, err = cli("run", recipe, "train.max_steps=1", 'eval.metrics=["eval_loss"]')
    assert code == 0, err
    assert secret not in out + err
    for path in (tmp_path / "runs" / "s").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_url_credentials_never_reach_a_file_or_a_log(
    tmp_path, monkeypatch, tiny_model_dir, chat_file, cli
):
    """A tracking_uri with user:password@, in the recipe and as an override: recipe.toml,
    resolved.json, run.json, the TensorBoard events and stderr show it masked and say where
    credentials go; the MLflow logger still gets them, through MLflow's environment variables."""
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    in_file, in_override = "PwInTheRecipe4242", "PwOnTheCommandLine77"
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, "")  # restored (removed) after the test
    log = (
        '\n[log]\nplugins = ["tensorboard", "mlflow"]\n[log.options.mlflow]\n'
        f'tracking_uri = "http://alice:{in_file}@127.0.0.1:9"\ntimeout_s = 1\n'
    )
    recipe = tiny_recipe(tmp_path, tiny_model_dir, chat_file, extra='name = "cred"\n' + log)
    code, out, err = cli(
        "run",
        recipe,
        "train.max_steps=1",
        'eval.metrics=["eval_loss"]',
        f"log.options.mlflow.tracking_uri=http://alice:{in_override}@127.0.0.1:9",
    )
    assert code == 0, err
    run = tmp_path / "runs" / "cred"
    written = [p for p in run.rglob("*") if p.is_file()]
    assert any("events.out.tfevents" in p.name for p in written)
    for secret in (in_file, in_override):
        assert secret not in out + err
        for path in written:
            assert secret.encode() not in path.read_bytes(), path
    assert "http://alice:***@127.0.0.1:9" in (run / "resolved.json").read_text()
    assert "http://alice:***@127.0.0.1:9" in (run / "recipe.toml").read_text()
    assert "log.options.mlflow.tracking_uri" in err and "MLFLOW_TRACKING_PASSWORD" in err, err
    import os

    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == in_override


def test_check_says_where_url_credentials_belong_and_never_prints_them(tmp_path, cli):
    from helpers import chat_records, write_jsonl, write_recipe

    pytest.importorskip("mlflow")
    write_jsonl(tmp_path / "c.jsonl", chat_records(10))
    recipe = write_recipe(
        tmp_path, [{"plugin": "chat_jsonl", "path": "c.jsonl"}], log={"plugins": ["mlflow"]}
    )
    uri = "log.options.mlflow.tracking_uri=https://bob:HushHush99@mlflow.example.invalid"
    code, out, err = cli("check", recipe, uri)
    assert "HushHush99" not in out + err
    assert code == 0, err
    assert "log.options.mlflow.tracking_uri" in out and "MLFLOW_TRACKING_PASSWORD" in out, out
