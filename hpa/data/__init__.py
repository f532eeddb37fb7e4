"""Training data: folds, the resized field cache and datasets over it, batch augmentation."""
