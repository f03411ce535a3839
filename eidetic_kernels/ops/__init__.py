"""One op per package: ``reference.py`` (readable, pure PyTorch) beside the fused backends."""
