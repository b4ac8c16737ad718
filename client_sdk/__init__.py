"""What runs on a user's device: local training, the encrypted store and the torch-free runtime."""
