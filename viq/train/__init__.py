"""Training: typed recipes (``recipe``), one engine (``engine``) that runs every stage (``stages``),
losses and checkpoints. Inference code (weights, model, nn, quant, tokenizer) never imports this package."""

from viq.train.recipe import Recipe, list_stages, load_recipe, parse_override, validate_recipe


def __getattr__(name):
    # Lazy: importing the engine pulls in transformers/peft/accelerate.
    if name in ("train", "TrainResult"):
        from viq.train import run

        return getattr(run, name)
    if name == "ProgressEvent":
        from viq.train.progress import ProgressEvent

        return ProgressEvent
    raise AttributeError(name)


__all__ = ["Recipe", "list_stages", "load_recipe", "parse_override", "validate_recipe", "train", "TrainResult",
           "ProgressEvent"]
