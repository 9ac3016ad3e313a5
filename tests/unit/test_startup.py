"""What the web process checks before it serves: the secret key and the Clerk settings."""

import pytest

from app.wsgi import authenticators, get_app
from pipeline.config import ConfigError, Settings


def test_the_api_refuses_to_start_in_production_without_a_secret_key():
    with pytest.raises(ConfigError, match="CAPY_SECRET_KEY is not set"):
        get_app(Settings.from_env({}))


def test_clerk_needs_an_issuer_and_https_outside_development():
    production = Settings.from_env({"CAPY_SECRET_KEY": "k" * 40})
    assert len(authenticators(production)) == 1
    with pytest.raises(ConfigError, match="CAPY_CLERK_ISSUER must be set"):
        authenticators(production.replace(clerk_jwks_url="https://clerk.example.com/jwks"))
    with pytest.raises(ConfigError, match="must be an https:// URL"):
        authenticators(
            production.replace(
                clerk_jwks_url="http://clerk.example.com/jwks",
                clerk_issuer="https://clerk.example.com",
            )
        )
    two = authenticators(
        production.replace(
            clerk_jwks_url="https://clerk.example.com/jwks",
            clerk_issuer="https://clerk.example.com",
        )
    )
    assert len(two) == 2
