"""Loading pretrained models and applying fine-tuning methods to them."""
