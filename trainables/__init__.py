"""Ray Tune trainables and the VAE library they wrap."""
