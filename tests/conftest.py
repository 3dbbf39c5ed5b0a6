"""Fixtures shared by the test files."""
import pytest


@pytest.fixture
def korean():
    """The Korean edition's setting for one test (`lora_lab.i18n`), then English and its font again."""
    from lora_lab import i18n

    i18n.set_language("ko")
    yield
    i18n.set_language(None)
    i18n.apply_font()  # back to the English figures' font for the tests after this one
