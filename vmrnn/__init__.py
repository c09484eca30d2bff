"""vmrnn-sweeps: train and tune VMRNN spatiotemporal forecasters with Ray Tune, Ray Train and MLflow."""

__version__ = "0.1.0"
