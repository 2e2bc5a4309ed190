"""cfm-jax: Coupling Flow Matching ("Boosting Latent Diffusion with Flow Matching") in JAX/Flax."""

__version__ = "0.1.0"
