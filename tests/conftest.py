import pytest


@pytest.fixture(scope="session")
def tokenizer():
    from sparse_lens.tokenizer import load_tokenizer

    return load_tokenizer()
