"""Data: read files, check rows, render them into token sequences with loss masks, batch them."""

from ftcluster.data.dataset import DataBundle, build_data

__all__ = ["DataBundle", "build_data"]
