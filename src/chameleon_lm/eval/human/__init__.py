"""Human evaluation: the annotation server and its page."""
