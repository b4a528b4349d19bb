"""Training pipeline: real Fashion-MNIST -> MLP -> safetensors model + model card (``python -m training``)."""
