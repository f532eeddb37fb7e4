"""Reading the data: HPA fields (8/16-bit PNG, TIFF, JPEG), instance masks, the Kaggle layout's label tables."""
