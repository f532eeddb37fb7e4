"""Networks by name: 4-channel backbones with a pooling + linear head (exact CAMs), the cell model from the image model."""
