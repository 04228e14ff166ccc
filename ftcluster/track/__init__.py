"""Tracking: throughput and MFU, GPU-hours and dollars, Weights & Biases."""
