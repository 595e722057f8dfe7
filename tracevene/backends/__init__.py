"""The three engines: plain PyTorch hooks (the reference), nnsight, TransformerLens."""
