"""MLflow tracking: where runs go, how they are named and tagged."""
