"""One module per stage: what the stage scripts in stages/ call (01 image model ... 07 evaluation)."""
