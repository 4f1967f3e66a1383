"""The heavy side: model loading, the image pipeline, compute and writers."""
