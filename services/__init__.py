"""The food-delivery platform's services, each run as `python -m services.<name>`."""
