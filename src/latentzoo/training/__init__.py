"""One training loop for every model family, run by Ray Train's TorchTrainer (DDP: gloo on CPU, nccl on GPU)."""
