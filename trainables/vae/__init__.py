"""The VAE library behind the trainables: datasets, models, priors, likelihoods, training, evaluation."""
