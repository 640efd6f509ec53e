"""viq: the ViQ discrete visual tokenizer (any-resolution SigLIP2 ViT -> 4 FSQ codes per patch)."""

__version__ = "0.1.0"

from viq.errors import ViQError  # noqa: E402

__all__ = ["__version__", "ViQError", "load_tokenizer"]


def __getattr__(name):
    # Lazy so that `import viq` stays cheap for the CLI's --help.
    if name == "load_tokenizer":
        from viq.tokenizer import load_tokenizer

        return load_tokenizer
    raise AttributeError(name)
