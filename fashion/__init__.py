"""What training and serving share: the contract (classes, input, normalization, architecture,
preprocessing), safe image decoding and the model files."""
