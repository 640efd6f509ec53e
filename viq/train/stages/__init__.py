"""The training stages the engine runs: each supplies only its model, its data and its loss."""
