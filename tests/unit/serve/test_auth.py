import pytest

from raychat.serve.auth import bearer_token, key_matches, load_api_keys


def test_keys_come_from_env_var_and_secret_file_without_blanks_or_comments(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# team keys\nsk-file-1\n\n  sk-file-2  \nsk-env-1\n")
    keys = load_api_keys("MY_KEYS", f, env={"MY_KEYS": "sk-env-1, sk-env-2,,"})
    assert keys == ["sk-env-1", "sk-env-2", "sk-file-1", "sk-file-2"]


def test_no_keys_configured_gives_an_empty_list():
    assert load_api_keys("MY_KEYS", None, env={}) == []


def test_missing_secret_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_api_keys(None, tmp_path / "absent")


@pytest.mark.parametrize(
    "header,token",
    [
        ("Bearer sk-1", "sk-1"),
        ("bearer  sk-1 ", "sk-1"),
        ("Basic abc", None),
        ("Bearer ", None),
        (None, None),
        ("sk-1", None),
    ],
)
def test_bearer_token_is_read_only_from_a_bearer_header(header, token):
    assert bearer_token(header) == token


def test_key_matches_only_configured_keys():
    keys = ["sk-a", "sk-bb"]
    assert key_matches("sk-bb", keys) and key_matches("sk-a", keys)
    assert not key_matches("sk-b", keys) and not key_matches("sk-bbb", keys)
    assert not key_matches(None, keys) and not key_matches("sk-a", [])
