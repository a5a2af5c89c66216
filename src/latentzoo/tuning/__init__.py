"""Ray Tune search of loss weights (tune stage)."""
