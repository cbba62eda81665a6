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
