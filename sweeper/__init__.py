"""VampPrior sweeper: hyperparameter sweeps of VAEs with the VampPrior on Ray Tune + MLflow."""

__version__ = "0.1.0"
