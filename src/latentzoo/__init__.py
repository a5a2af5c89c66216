"""latentzoo: autoencoder-style generative models trained by one DVC + Ray Train + MLflow pipeline."""

import os as _os

__version__ = "0.1.0"

# Every Ray worker and tune trial prints one progress line per epoch; Ray's log de-duplication would fold
# concurrent trials' lines into "[repeated 2x across cluster]". Ray reads this once, when it is imported.
_os.environ.setdefault("RAY_DEDUP_LOGS", "0")
