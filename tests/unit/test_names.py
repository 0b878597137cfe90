import pytest

from machine.errors import UsageError
from machine.names import validate_name


@pytest.mark.parametrize("name", ["a", "web1", "Web-1", "x" * 63, "1host"])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "..", "a/b", "has space", "x" * 64, "-lead", "trail-", "dot.ted", "under_score"])
def test_invalid_names(name):
    with pytest.raises(UsageError):
        validate_name(name)
