"""Offline data sets: embedded MNIST subset, IDX and CIFAR-10 files from a data directory."""
