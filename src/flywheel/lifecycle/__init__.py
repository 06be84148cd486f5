"""The model lifecycle: the use cases behind `flywheel.api`, one module each. Train a challenger
(`train`), evaluate it against the champion (`evaluation`), promote and roll back (`aliases`, where
every alias move goes through `move_alias`), show the status (`status`), ingest (`intake`), import a
model (`importing`), propose a config (`init`), read and prune the prediction log (`prediction_log`).

Import the module you need (`from flywheel.lifecycle.train import train_challenger`); from a notebook
use `flywheel.api`, the one stable surface.
"""
