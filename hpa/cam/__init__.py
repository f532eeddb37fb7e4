"""Class activation maps: methods (exact CAM, grad-cam's), the maps' normalisation and storage, overlays."""
