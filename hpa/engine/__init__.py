"""The training engine shared by the image and cell models: trainer, losses, schedule, checkpoints, inference."""
