"""ImageNet-1K's normalisation statistics (RGB, on the 0..1 scale), defined once for the data
pipeline, the configs and the published-weights table. Imports nothing."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
